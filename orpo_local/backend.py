"""The one interface the core calls; backends/ implements it for torch and MLX.

Only plain Python and NumPy values cross it: batches are dicts of NumPy arrays
(orpo_local.batching), metrics are dicts of floats, generation yields token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from .batching import target_masks
from .config import LoraConfig, ModelConfig, OptimConfig, OrpoConfig

Batch = dict[str, np.ndarray]


@dataclass
class ModelInfo:
    """What was loaded, for run.json, the UI and the logs."""

    backend: str
    model_path: str
    device: str
    dtype: str
    quantized: bool
    n_params: int
    n_trainable: int
    batch_layout: str = "plain"  # "shared" / "prefix": each pair's prompt computed once (orpo_local.batching)


class Backend(Protocol):
    name: str
    tokenizer: Any  # a Hugging Face tokenizer with a chat template
    pad_to: int  # batches are padded to a multiple of this (32 where compiled shapes should repeat)
    layout: str  # the batch layout it consumes (orpo_local.batching): "plain", or "shared"/"prefix" once a model that allows it is loaded

    def load(self, model: ModelConfig, lora: LoraConfig | None, seed: int,
             adapter: str | Path | None = None, trainable: bool = True) -> ModelInfo:
        """Load model and tokenizer; attach fresh LoRA (lora given), or the saved adapter at `adapter`."""

    def init_optimizer(self, optim: OptimConfig) -> None:
        """Create the optimiser over the trainable (LoRA) weights."""

    def train_step(self, micro_batches: list[Batch], learning_rate: float, orpo: OrpoConfig,
                   max_grad_norm: float) -> dict[str, float]:
        """One optimiser step over the micro-batches, the loss normalised over all of them.

        Returns every ORPO_SPEC metric plus grad_norm and tokens; skips the update (and returns
        a non-finite loss) when the loss or gradient is not finite.
        """

    def evaluate(self, batches: list[Batch], orpo: OrpoConfig) -> dict[str, float]:
        """ORPO metrics over all batches taken as one window, without gradients."""

    def generate(self, prompt_ids: list[int], max_tokens: int, temperature: float, top_p: float,
                 stop_ids: set[int], seed: int | None = None) -> Iterator[int]:
        """Stream sampled token ids (temperature 0 = greedy), stopping after a stop id."""

    def save_adapter(self, path: Path) -> None:
        """Write the adapter in the framework's own format (a PEFT folder, mlx-lm adapters)."""

    def save_merged(self, path: Path) -> None:
        """Write the model with its adapter merged into the weights, as a plain model folder
        (transformers for torch, mlx-lm for MLX) with its tokenizer."""

    def save_state(self, path: Path) -> None:
        """Write optimiser and RNG state beside the adapter, for exact resume."""

    def load_state(self, path: Path) -> None:
        """Restore what save_state wrote (after init_optimizer)."""

    def peak_memory_mb(self) -> float:
        """Peak memory used for training so far (accelerator memory where there is one)."""


def window_sizes(micro_batches: list[Batch], nll_on_prompt: bool) -> tuple[int, int]:
    """(NLL target tokens, pairs) of a whole accumulation window, in either batch layout: the loss normalisers."""
    n_tokens = n_pairs = 0
    for b in micro_batches:
        if "prompt_ids" in b:  # prefix: prompts once, answers beside them
            n_tokens += int(b["answer_len"][: len(b["prompt_len"])].sum()) + (int((b["prompt_len"] - 1).sum()) if nll_on_prompt else 0)
            n_pairs += len(b["prompt_len"])
        elif "segment" in b:  # shared: a row per pair
            n_tokens += int(target_masks(b, nll_on_prompt)[2].sum())
            n_pairs += len(b["input_ids"])
        else:
            key = "attention_mask" if nll_on_prompt else "response_mask"
            n_tokens += int(b[key][: len(b[key]) // 2, 1:].sum())
            n_pairs += len(b["input_ids"]) // 2
    return n_tokens, n_pairs


def real_tokens(batch: Batch) -> int:
    """Tokens that are not padding, in either layout (what tokens/s counts)."""
    if "prompt_ids" in batch:
        return int(batch["prompt_len"].sum() + batch["answer_len"].sum())
    return int((batch["segment"] > 0).sum()) if "segment" in batch else int(batch["attention_mask"].sum())


def orpo_metrics(loss, nll, log_sig, log_odds, chosen, rejected, accuracy_sum, lambda_: float, n_pairs) -> dict:
    """ORPO_SPEC metrics from one batch's pieces, for any array type with arithmetic and .sum()
    (torch, MLX): each is a batch sum over the window's `n_pairs`, so micro-batches add up."""
    return {
        "loss": loss,
        "nll_loss": nll,
        "or_loss": -log_sig.sum() / n_pairs,
        "log_odds_ratio": log_sig.sum() / n_pairs,
        "log_odds_chosen": log_odds.sum() / n_pairs,
        "logps/chosen": chosen.sum() / n_pairs,
        "logps/rejected": rejected.sum() / n_pairs,
        "rewards/chosen": lambda_ * chosen.sum() / n_pairs,
        "rewards/rejected": lambda_ * rejected.sum() / n_pairs,
        "rewards/accuracies": accuracy_sum / n_pairs,
        "rewards/margins": lambda_ * (chosen - rejected).sum() / n_pairs,
    }
