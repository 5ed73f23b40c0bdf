"""PyTorch backend: transformers + peft LoRA; 4-bit NF4 QLoRA through bitsandbytes.

On CUDA: NF4 with double quantisation and bf16 compute (QLoRA, Dettmers et al. 2023).
On CPU: bf16 where the CPU has native bf16 matmuls, else float32; 4-bit optional (saves memory, not time).

The math is pure functions: `orpo_loss` (from logits) and `orpo_loss_from_token_logps`, which
training uses after `model_token_logps` projects to the vocabulary only at target positions; all
are tested against the float64 reference in tests/reference.py. The class only holds model,
optimiser and RNG state.
"""

from __future__ import annotations

import math
import resource
import sys
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from orpo_local.backend import Batch, ModelInfo, orpo_metrics, real_tokens, window_sizes
from orpo_local.batching import shared_attention, target_masks
from orpo_local.config import LoraConfig, ModelConfig, OptimConfig, OrpoConfig

LN2 = math.log(2.0)
CLAMP = -1e-7


# ----------------------------------------------------------------------------- the math

def _work(logits: torch.Tensor) -> torch.Tensor:
    """The loss runs in float32 (float64 stays float64, for the reference tests)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(N, T-1): log P(input_ids[:, t] | < t). cross_entropy fuses log-softmax and gather."""
    work = _work(logits[:, :-1])
    targets = input_ids[:, 1:].long()
    n, t, v = work.shape
    return -F.cross_entropy(work.reshape(n * t, v), targets.reshape(n * t), reduction="none").view(n, t)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(N,): mean log-prob of each row's response tokens (ORPO_SPEC: logp(y|x))."""
    mask = response_mask[:, 1:].to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    return (token_logps(logits, input_ids) * mask).sum(-1) / mask.sum(-1)


def log1mexp(v: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(v)), stable on both sides of -ln 2; v clamped to <= -1e-7."""
    v = v.clamp(max=CLAMP)
    return torch.where(v < -LN2, torch.log1p(-torch.exp(v)), torch.log(-torch.expm1(v)))


def orpo_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], lambda_: float = 0.1, nll_on_prompt: bool = False,
              num_tokens: float | None = None, num_pairs: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO loss (Hong et al. 2024, eq. 6-7) and its metrics for a chosen-then-rejected batch.

    logits (2B, T, V); batch holds input_ids, attention_mask, response_mask (2B, T).
    num_tokens / num_pairs: normalisers of the whole accumulation window (default: this batch).
    Every metric is a sum over this batch divided by them, so micro-batch values add up.
    """
    return orpo_loss_from_token_logps(token_logps(logits, batch["input_ids"]), batch, lambda_, nll_on_prompt, num_tokens, num_pairs)


def orpo_loss_from_token_logps(tl: torch.Tensor, batch: dict[str, torch.Tensor], lambda_: float = 0.1, nll_on_prompt: bool = False,
                               num_tokens: float | None = None, num_pairs: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`orpo_loss` from per-token log-probs tl (2B, T-1); entries outside the target masks are ignored."""
    resp = batch["response_mask"][:, 1:].to(tl.dtype)
    b = resp.shape[0] // 2
    nll_mask = (batch["attention_mask"][:, 1:].to(tl.dtype) if nll_on_prompt else resp)[:b]
    logps = (tl * resp).sum(-1) / resp.sum(-1)
    return orpo_terms(logps[:b], logps[b:], (tl[:b] * nll_mask).sum(), nll_mask.sum(), lambda_, b, num_tokens, num_pairs)


def shared_orpo_loss(tl: torch.Tensor, batch: dict[str, torch.Tensor], lambda_: float = 0.1, nll_on_prompt: bool = False,
                     num_tokens: float | None = None, num_pairs: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`orpo_loss` of a prefix-shared batch (orpo_local.batching, "shared"): tl (B, T) holds the log-prob of
    token t predicted at prev[t]; the chosen_mask / rejected_mask / nll_mask entries say which tokens count."""
    chosen, rejected, nll_mask = (batch[k].to(tl.dtype) for k in ("chosen_mask", "rejected_mask", "nll_mask"))
    c = (tl * chosen).sum(-1) / chosen.sum(-1)
    r = (tl * rejected).sum(-1) / rejected.sum(-1)
    return orpo_terms(c, r, (tl * nll_mask).sum(), nll_mask.sum(), lambda_, len(c), num_tokens, num_pairs)


def orpo_terms(c: torch.Tensor, r: torch.Tensor, nll_sum: torch.Tensor, nll_count, lambda_: float, b: int,
               num_tokens: float | None, num_pairs: float | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss from the (B,) mean log-probs of the chosen and rejected answers and the summed NLL
    log-probs; num_tokens / num_pairs: the whole window's normalisers (default: this batch's)."""
    n_tok = nll_count if num_tokens is None else num_tokens
    n_pairs = b if num_pairs is None else num_pairs
    nll = -nll_sum / n_tok
    log_odds = (c - log1mexp(c)) - (r - log1mexp(r))
    log_sig = F.logsigmoid(log_odds)
    loss = nll - lambda_ * log_sig.sum() / n_pairs
    with torch.no_grad():
        metrics = orpo_metrics(loss.detach(), nll.detach(), log_sig, log_odds, c, r, (c > r).to(c.dtype).sum(), lambda_, n_pairs)
    return loss, metrics


def target_mask(batch: dict[str, torch.Tensor], nll_on_prompt: bool) -> torch.Tensor:
    """(2B, T-1) bool: next-token predictions the loss reads (responses; chosen prompts too with nll_on_prompt)."""
    mask = batch["response_mask"][:, 1:].bool()
    if nll_on_prompt:
        mask = mask.clone()
        b = mask.shape[0] // 2
        mask[:b] |= batch["attention_mask"][:b, 1:].bool()
    return mask


# Architectures whose logits are exactly lm_head(last hidden state). Others (Granite's
# logits_scaling, Gemma 2's soft-capping, Cohere's logit_scale, remote code) keep the full forward.
PLAIN_LOGITS = {"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2", "starcoder2", "gemma"}


# Architectures whose decoder takes position_ids and a custom 4D attention mask: they run prefix-shared
# batches (each prompt computed once). A sliding window would be replaced by that mask, so a model
# that uses one keeps the plain layout, as every other architecture does.
SHARED_PREFIX = {"llama", "mistral", "qwen2", "qwen3", "olmo2"}


def pick_layout(model, wanted: bool) -> str:
    """The batch layout this model runs: "shared" where SHARED_PREFIX allows it (and prefix sharing is on)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = causal_lm.config
    sliding = getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True)
    ok = (wanted and cfg.model_type in SHARED_PREFIX and not sliding and _selective_parts(model) is not None
          and getattr(cfg, "_attn_implementation", "sdpa") in ("sdpa", "eager"))
    return "shared" if ok else "plain"


def _selective_parts(model):
    """(decoder, lm_head) when logits are a plain linear map of the last hidden state, else None."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(causal_lm, "config", None), "model_type", None) not in PLAIN_LOGITS:
        return None
    decoder, head = getattr(causal_lm, "model", None), getattr(causal_lm, "lm_head", None)
    if decoder is None or not isinstance(head, torch.nn.Linear):
        return None
    return decoder, head


# Float32 logits computed at once, at most (bytes): above it the vocabulary projection runs in chunks,
# each recomputed in the backward pass, so peak memory stays flat however large the vocabulary is.
LOGITS_BUDGET = 256 << 20


def head_logps(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, budget: int | None = None) -> torch.Tensor:
    """(K,) log P(targets | hidden (K, H)) through the output layer, never holding more than `budget` (default
    LOGITS_BUDGET, read at the call) bytes of logits."""
    budget = LOGITS_BUDGET if budget is None else budget
    def logps(h, y):
        return -F.cross_entropy(_work(head(h)), y, reduction="none")

    chunk = max(1, budget // (4 * head.out_features))
    if len(targets) <= chunk:
        return logps(hidden, targets)
    from torch.utils.checkpoint import checkpoint

    return torch.cat([checkpoint(logps, hidden[i: i + chunk], targets[i: i + chunk], use_reentrant=False)
                      for i in range(0, len(targets), chunk)])


def model_token_logps(model, batch: dict[str, torch.Tensor], nll_on_prompt: bool) -> torch.Tensor:
    """(2B, T-1) token log-probs from the model, projecting to the vocabulary only where the loss
    needs it: prompt and pad positions skip the (H x V) head, and no (2B, T, V) logits exist."""
    ids, att = batch["input_ids"].long(), batch["attention_mask"]
    parts = _selective_parts(model)
    if parts is None:
        return token_logps(model(input_ids=ids, attention_mask=att, use_cache=False).logits, ids)
    decoder, head = parts
    hidden = decoder(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state  # (2B, T, H)
    mask = target_mask(batch, nll_on_prompt)
    picked = head_logps(head, hidden[:, :-1][mask], ids[:, 1:][mask])  # K = number of targets
    return torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)


def shared_token_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) log-probs of a prefix-shared batch: one forward per pair over [prompt][chosen][rejected] with
    the rejected answer's positions restarting after the prompt and a mask hiding the chosen answer from
    it; token t is read from the output at prev[t]. Zero where no target is."""
    ids = batch["input_ids"].long()
    decoder, head = _selective_parts(model)
    dtype = decoder.get_input_embeddings().weight.dtype
    # additive, as eager attention adds it to the scores and SDPA takes it as it is: 0 = attend
    bias = torch.zeros(batch["attention"].shape, dtype=dtype, device=ids.device).masked_fill_(~batch["attention"], torch.finfo(dtype).min)
    hidden = decoder(input_ids=ids, position_ids=batch["position_ids"].long(), attention_mask=bias[:, None],
                     use_cache=False).last_hidden_state  # (B, T, H)
    rows, cols = (batch["chosen_mask"] | batch["rejected_mask"] | batch["nll_mask"]).nonzero(as_tuple=True)
    picked = head_logps(head, hidden[rows, batch["prev"][rows, cols].long()], ids[rows, cols])
    return torch.zeros(ids.shape, dtype=picked.dtype, device=picked.device).index_put((rows, cols), picked)


def to_device(mb: Batch, nll_on_prompt: bool, device) -> dict[str, torch.Tensor]:
    """A NumPy batch as tensors; a prefix-shared one also gets its attention mask and target masks."""
    if "segment" in mb:
        chosen, rejected, nll = target_masks(mb, nll_on_prompt)
        mb = {**mb, "attention": shared_attention(mb["segment"]), "chosen_mask": chosen, "rejected_mask": rejected, "nll_mask": nll}
    return {k: torch.from_numpy(v).to(device) for k, v in mb.items()}


def batch_token_logps(model, t: dict[str, torch.Tensor], nll_on_prompt: bool) -> torch.Tensor:
    """Token log-probs of one micro-batch of either layout (`shared_token_logps` or `model_token_logps`);
    `model` may be the FSDP root (`Sharded`), whose forward computes them."""
    if isinstance(model, Sharded):
        return model(t, nll_on_prompt)
    return shared_token_logps(model, t) if "segment" in t else model_token_logps(model, t, nll_on_prompt)


def window_loss(model, t: dict[str, torch.Tensor], lambda_: float, nll_on_prompt: bool, n_tok, n_pairs):
    """Loss and metrics of one micro-batch of either layout, with the window's normalisers."""
    tl = batch_token_logps(model, t, nll_on_prompt)
    if "segment" in t:
        return shared_orpo_loss(tl, t, lambda_, nll_on_prompt, n_tok, n_pairs)
    return orpo_loss_from_token_logps(tl, t, lambda_, nll_on_prompt, n_tok, n_pairs)


def backward_window(model, micro_batches: list[Batch], lambda_: float, nll_on_prompt: bool, device,
                    idle_passes: int = 0) -> dict[str, float]:
    """Forward + backward every micro-batch with whole-window normalisers; gradients accumulate
    to exactly those of one big batch. Returns the window's metrics (plus `tokens`).

    Under torch.distributed (torchrun) each process holds a share of the window: the normalisers
    and metrics are summed over all of them, so after `all_reduce_grads` (or FSDP's reduce-scatter)
    every process has the gradients of the whole window, exactly as one process would.
    `idle_passes`: passes that add nothing, run before the metrics are summed, so that under FSDP a
    process with a smaller share runs as many passes (and so collectives) as the others."""
    n_tok, n_pairs = _global_sums(window_sizes(micro_batches, nll_on_prompt), device)
    totals: dict[str, torch.Tensor] = {}
    tokens = 0
    for mb in micro_batches:
        loss, metrics = window_loss(model, to_device(mb, nll_on_prompt, device), lambda_, nll_on_prompt, n_tok, n_pairs)
        loss.backward()
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v
        tokens += real_tokens(mb)
    for _ in range(idle_passes):
        idle_pass(model, device)
    names = sorted(METRIC_NAMES)
    sums = _global_sums([float(totals.get(k, 0.0)) for k in names] + [tokens], device)
    out = dict(zip(names, sums[:-1]))
    out["tokens"] = sums[-1]
    return out


# Every metric of orpo_metrics is a sum over the window divided by its normalisers: they add up across processes.
METRIC_NAMES = ("loss", "nll_loss", "or_loss", "log_odds_ratio", "log_odds_chosen", "logps/chosen", "logps/rejected",
                "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def _distributed():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _global_sums(values, device) -> list[float]:
    """`values` summed over every process (unchanged in a single process)."""
    dist = _distributed()
    if dist is None:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _global_max(value: int, device) -> int:
    """The largest `value` of any process."""
    dist = _distributed()
    if dist is None:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum the gradients over every process, in one flat buffer (a process with no micro-batch adds zeros)."""
    dist = _distributed()
    if dist is None:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(grads[0].dtype) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()


# ----------------------------------------------------------------------------- sharding (FSDP2)

class Sharded(torch.nn.Module):
    """The FSDP root around the (PEFT) model: its forward is `batch_token_logps`, so FSDP gathers the
    weights outside the decoder blocks (embeddings, final norm, output layer) for the whole of it,
    although the selective head projection calls the decoder and the head one after the other."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, t: dict[str, torch.Tensor], nll_on_prompt: bool) -> torch.Tensor:
        return batch_token_logps(self.model, t, nll_on_prompt)


def shard(model, device: str) -> Sharded:
    """Shard `model` over every process with FSDP2, as torchtune and accelerate do: each decoder block
    (the architecture's `_no_split_modules`) is one unit, the rest goes in the root.

    FSDP averages the gradients over the processes by default; it sums them here (divide factor 1),
    because the loss is already divided by the whole window's tokens and pairs: the summed gradients
    are one process's over the same window. The blocks are moved to `device` as they are sharded."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(causal_lm, "_no_split_modules", None) or ())
    blocks = [m for m in causal_lm.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"model.fsdp: {causal_lm.config.model_type} names no decoder blocks (_no_split_modules) to shard; "
                         "turn model.fsdp off to train it data-parallel")
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    root = Sharded(model)
    for unit in [*blocks, root]:
        fully_shard(unit, mesh=mesh)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return root


def idle_pass(model, device, backward: bool = True) -> None:
    """A forward (and backward) pass through every FSDP unit that adds zero to every gradient."""
    ids = torch.zeros((2, 2), dtype=torch.long, device=device)
    t = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": torch.tensor([[0, 1], [0, 1]], device=device)}
    tl = batch_token_logps(model, t, False)
    if backward:
        (tl.sum() * 0).backward()


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (DTensor) gathered whole on every process (a collective); a plain one as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _sharded_like(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Whole `t` (the same on every process) cut the way `param` is sharded; anything else as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and not isinstance(t, DTensor) and t.shape == param.shape:
        return distribute_tensor(t.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return t


# ----------------------------------------------------------------------------- the backend

def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(name: str, device: str) -> torch.dtype:
    """auto: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX: ~1.7x faster steps here), else float32."""
    if name == "auto":
        native_bf16 = device == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if native_bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class TorchBackend:
    """Holds the model, optimiser and RNG; all math is in the functions above."""

    name = "torch"
    pad_to = 8  # eager torch gains nothing from repeated shapes; less padding is less compute
    layout = "plain"  # until a model is loaded: then pick_layout's choice

    def __init__(self):
        self.model = None
        self.sharded = None  # the FSDP root around self.model when model.fsdp trains it
        self.tokenizer = None
        self.optimizer = None
        self.device = pick_device()

    def load(self, model: ModelConfig, lora: LoraConfig | None, seed: int, adapter=None, trainable: bool = True) -> ModelInfo:
        from orpo_local.models import resolve_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        fsdp = model.fsdp and trainable  # chat, eval and export load an FSDP run's adapter on one process
        if fsdp:
            _check_fsdp()
        path = resolve_model(model.name, progress=lambda m: print(m, file=sys.stderr))
        dtype = pick_dtype(model.dtype, self.device)
        kwargs = {"dtype": dtype}
        if model.load_in_4bit:
            kwargs["quantization_config"] = _nf4_config(dtype, fsdp)
            kwargs["device_map"] = {"": _this_device(self.device)}
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # safetensors only (a pickled .bin can run code) unless model.allow_pickle_weights; never the folder's own code
        base = AutoModelForCausalLM.from_pretrained(path, use_safetensors=not model.allow_pickle_weights, trust_remote_code=False, **kwargs)
        if not (model.load_in_4bit or fsdp):  # FSDP moves each block to the device as it shards it
            base.to(self.device)
        base.config.use_cache = False
        if model.load_in_4bit and trainable:
            from peft import prepare_model_for_kbit_training

            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=model.gradient_checkpointing)
            _keep_4bit_trainable(base)
        elif model.gradient_checkpointing and trainable:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        torch.manual_seed(seed)  # LoRA init
        self.model = _attach_adapter(base, lora, adapter, trainable)
        self.layout = pick_layout(self.model, model.prefix_sharing)
        n_params = sum(_numel(p) for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.sharded = shard(self.model, self.device) if fsdp else None
        return ModelInfo("torch", path, self.device, str(dtype).replace("torch.", ""), model.load_in_4bit, n_params, n_train,
                         batch_layout=self.layout)

    def init_optimizer(self, optim: OptimConfig) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = {"fused": True} if self.device == "cuda" else {}
        self.optimizer = torch.optim.AdamW(params, lr=optim.learning_rate, weight_decay=optim.weight_decay, **fused)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def train_step(self, micro_batches: list[Batch], learning_rate: float, orpo: OrpoConfig, max_grad_norm: float) -> dict[str, float]:
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.optimizer.zero_grad(set_to_none=True)
        # FSDP: every process runs as many passes as the one with the largest share; their reduce-scatters sum the gradients
        idle = _global_max(len(micro_batches), self.device) - len(micro_batches) if self.sharded else 0
        metrics = backward_window(self.sharded or self.model, micro_batches, orpo.lambda_, orpo.nll_on_prompt, self.device, idle)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if not self.sharded:
            all_reduce_grads(params)
        # on sharded (DTensor) gradients the norm is the global one over every shard
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
        metrics["grad_norm"] = float(_whole(norm))
        if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    @torch.no_grad()
    def evaluate(self, batches: list[Batch], orpo: OrpoConfig) -> dict[str, float]:
        """Metrics over all `batches`. Under FSDP each process scores its share (and idle passes up to the largest
        share, for the collectives); the sums are the same on every process, so all of them take the same best/
        decision, whose save gathers."""
        from orpo_local.distributed import world

        self.model.eval()
        n_tok, n_pairs = window_sizes(batches, orpo.nll_on_prompt)
        w = world()
        mine = w.share(batches) if self.sharded else batches
        totals: dict[str, float] = dict.fromkeys(METRIC_NAMES, 0.0)
        for mb in mine:
            _, metrics = window_loss(self.sharded or self.model, to_device(mb, orpo.nll_on_prompt, self.device), orpo.lambda_,
                                     orpo.nll_on_prompt, n_tok, n_pairs)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        if not self.sharded:
            return totals
        for _ in range(math.ceil(len(batches) / w.size) - len(mine)):  # up to the largest share
            idle_pass(self.sharded, self.device, backward=False)
        return dict(zip(totals, _global_sums(list(totals.values()), self.device)))

    @torch.no_grad()
    def generate(self, prompt_ids, max_tokens, temperature, top_p, stop_ids, seed=None) -> Iterator[int]:
        self.model.eval()
        gen = torch.Generator(device=self.device)
        if seed is not None:
            gen.manual_seed(seed)
        else:
            gen.seed()  # fresh entropy for this generator only, the global RNG is untouched
        out = self.model(input_ids=torch.tensor([prompt_ids], device=self.device), use_cache=True)
        for _ in range(max_tokens):
            token = _sample(out.logits[0, -1].float(), temperature, top_p, gen)
            yield token
            if token in stop_ids:
                return
            out = self.model(input_ids=torch.tensor([[token]], device=self.device), past_key_values=out.past_key_values, use_cache=True)

    def save_adapter(self, path: Path) -> None:
        """A plain PEFT folder; under FSDP from the whole adapter, which every process gathers (so all call this)."""
        if self.sharded:
            whole = {n: _whole(p).detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
            self.model.save_pretrained(str(path), safe_serialization=True, state_dict=whole)
        else:
            self.model.save_pretrained(str(path), safe_serialization=True)

    def save_merged(self, path: Path) -> None:
        model = self.model.merge_and_unload() if hasattr(self.model, "merge_and_unload") else self.model
        model.config.use_cache = True
        model.save_pretrained(str(path), safe_serialization=True)
        self.tokenizer.save_pretrained(str(path))

    def save_state(self, path: Path) -> None:
        """optimizer.pt; under FSDP the moments are gathered whole, so the file is a one-process run's."""
        optimizer = self.optimizer.state_dict()
        if self.sharded:
            optimizer["state"] = {i: {k: _whole(v) for k, v in s.items()} for i, s in optimizer["state"].items()}
        state = {"optimizer": optimizer, "torch_rng": torch.get_rng_state()}
        if self.device == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save(state, Path(path) / "optimizer.pt")

    def load_state(self, path: Path) -> None:
        state = torch.load(Path(path) / "optimizer.pt", map_location=self.device, weights_only=True)  # no code from a checkpoint
        self.optimizer.load_state_dict(state["optimizer"])
        if self.sharded:  # each process keeps its shard of the whole moments
            for p, s in self.optimizer.state.items():
                s.update({k: _sharded_like(v, p) for k, v in s.items()})
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def peak_memory_mb(self) -> float:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _keep_4bit_trainable(model) -> None:
    """On AVX512-BF16 CPUs bitsandbytes repacks a 4-bit weight for a faster inference kernel the first
    time the layer runs without gradients (an evaluation); that kernel has no backward, so every later
    training step would get wrong gradients. A model that trains keeps the plain 4-bit kernel."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _nf4_config(compute_dtype: torch.dtype, fsdp: bool = False):
    """NF4 with double quantisation. For FSDP-QLoRA the packed 4-bit weights are stored in the compute dtype
    (bnb_4bit_quant_storage), as the other weights of a block are, so FSDP can shard them (it shards floats only)."""
    from transformers import BitsAndBytesConfig

    storage = {"bnb_4bit_quant_storage": compute_dtype} if fsdp else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, **storage)


def _check_fsdp() -> None:
    """Refuse model.fsdp where it cannot run: one process, or a torch without FSDP2's plain-sum reductions (2.8)."""
    import torch.distributed.fsdp as fsdp

    from orpo_local.distributed import world

    if world().size < 2:
        raise ValueError("model.fsdp shards the model across training processes, and this is one process: train with "
                         "`orpo-local train --nproc N` (or under torchrun) with N >= 2, or turn model.fsdp off")
    if not hasattr(getattr(fsdp, "FSDPModule", None), "set_force_sum_reduction_for_comms"):
        raise ValueError(f"model.fsdp needs torch 2.8 or later (FSDP2 summing the gradients), this is {torch.__version__}: "
                         "pip install -U 'torch>=2.8', or turn model.fsdp off")


def _this_device(device: str):
    """Where this process's 4-bit weights load: its own GPU under torchrun (init_torch set it), else `device`."""
    return torch.cuda.current_device() if device == "cuda" else device


def _attach_adapter(base, lora: LoraConfig | None, adapter, trainable: bool):
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if adapter is not None:
        return PeftModel.from_pretrained(base, str(adapter), is_trainable=trainable)
    if lora is None:
        return base
    n_layers = base.config.num_hidden_layers
    layers = None if lora.num_layers in (-1, None) or lora.num_layers >= n_layers else list(range(n_layers - lora.num_layers, n_layers))
    cfg = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
                         layers_to_transform=layers, task_type="CAUSAL_LM")
    return get_peft_model(base, cfg)


def _numel(p: torch.Tensor) -> int:
    """Parameter count; bitsandbytes packs two 4-bit weights per byte."""
    return p.numel() * 2 if p.__class__.__name__ == "Params4bit" else p.numel()


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, -1)
    if 0 < top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))

