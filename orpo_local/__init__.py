"""orpo_local: ORPO preference tuning of chat models on your own machine.

    from orpo_local import TrainConfig, train, ChatSession, load_pairs
    run = train(TrainConfig().with_overrides(["max_steps=30"]))
    print(ChatSession.from_run(run.run_dir).reply("你好"))

The core imports neither torch nor mlx; backends live in orpo_local.backends.
"""

__version__ = "0.1.0"

from .chat import ChatSession  # noqa: E402
from .config import TrainConfig  # noqa: E402
from .data import PreferencePair, load_pairs, split_pairs  # noqa: E402
from .train import RunResult, train  # noqa: E402

__all__ = ["ChatSession", "PreferencePair", "RunResult", "TrainConfig", "__version__", "load_pairs", "split_pairs", "train"]
