"""Framework backends (torch, mlx). Installed as orpo_local.backends."""
