"""Gradio web UI. Installed as orpo_local.ui."""
