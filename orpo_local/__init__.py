"""orpo_local: ORPO preference tuning of chat models on your own machine.

    from orpo_local import TrainConfig, load_pairs
    pairs = load_pairs("zh-sample")

The core imports neither torch nor mlx; backends live in orpo_local.backends.
"""

from .config import TrainConfig
from .data import PreferencePair, load_pairs, split_pairs

__version__ = "0.1.0"
__all__ = ["PreferencePair", "TrainConfig", "__version__", "load_pairs", "split_pairs"]
