"""Chat with a tuned run or a base model, streaming, with multi-turn history.

    chat = ChatSession.from_run("runs/20261123-101500-smollm2-135m-instruct")
    for piece in chat.stream("用一句话介绍长城。"):
        print(piece, end="", flush=True)
    base = ChatSession.from_model("smollm2-135m-instruct")   # the same model without the adapter

Prompts go through the same ChatEncoder as training, so the run's chat template (the one it
recorded, chat_template.jinja) and the rule that user text never becomes control tokens apply
here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from .config import ModelConfig, TrainConfig
from .runs import final_adapter, run_backend, run_template
from .tokenization import ChatEncoder


class ChatSession:
    def __init__(self, backend, system: str | None = None, temperature: float = 0.7, top_p: float = 0.9,
                 max_tokens: int = 256, seed: int | None = None, template: str = "auto"):
        self.backend = backend
        self.encoder = ChatEncoder(backend.tokenizer, template)
        self.system = system
        self.temperature, self.top_p, self.max_tokens, self.seed = temperature, top_p, max_tokens, seed
        self.history: list[dict] = []

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str | Path | None = None, backend=None, **options) -> "ChatSession":
        """The run's base model with its final adapter (or `checkpoint`, a checkpoint folder). `backend` (a name
        or a loaded backend; default the run's own) may be the other framework: the adapter is converted for it."""
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").exists():
            raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml)")
        config = TrainConfig.from_yaml(run_dir / "config.yaml")
        adapter = Path(checkpoint) / "adapter" if checkpoint else final_adapter(run_dir)
        if adapter is None or not adapter.exists():
            raise FileNotFoundError(f"{run_dir}: no adapter yet (the run has no final adapter and no checkpoint)")
        if backend is None or isinstance(backend, str):
            from .backends import get_backend

            backend = get_backend(run_backend(run_dir, config.model.backend) if backend in (None, "auto") else backend)
        if backend.name != run_backend(run_dir, config.model.backend):
            from .export import adapter_for

            adapter = adapter_for(run_dir, backend.name, checkpoint)
        backend.load(config.model, None, config.run.seed, adapter=adapter, trainable=False)
        return cls(backend, template=run_template(run_dir), **options)

    @classmethod
    def from_model(cls, name: str, backend: str | object = "auto", load_in_4bit: bool = False, **options) -> "ChatSession":
        """A base model with no adapter (template="auto" by default; pass a run's run_template() to compare)."""
        if isinstance(backend, str):
            from .backends import get_backend

            backend = get_backend(backend)
        backend.load(ModelConfig(name=name, load_in_4bit=load_in_4bit), None, 0, adapter=None, trainable=False)
        return cls(backend, **options)

    def messages(self, user_message: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": user_message}]

    def stream(self, user_message: str) -> Iterator[str]:
        """Yield the reply as text pieces; the finished turn joins the history."""
        prompt = self.encoder.encode(self.messages(user_message), add_generation_prompt=True)
        ids: list[int] = []
        shown = ""
        tok = self.backend.tokenizer
        for token in self.backend.generate(prompt, self.max_tokens, self.temperature, self.top_p, self.encoder.stop_ids, self.seed):
            if token in self.encoder.stop_ids:
                break
            ids.append(token)
            text = tok.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                continue
            yield text[len(shown):]
            shown = text
        # max_tokens or a stop token can cut a character between its byte tokens; the bytes left of it
        # decode to U+FFFD. Dropped, so it is neither shown nor fed back as history on the next turn
        # (a reply that really ends in U+FFFD loses it: text alone cannot tell the two apart).
        text = tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
        if len(text) > len(shown):
            yield text[len(shown):]
        self.history += [{"role": "user", "content": user_message}, {"role": "assistant", "content": text}]

    def reply(self, user_message: str) -> str:
        return "".join(self.stream(user_message))

    def reset(self) -> None:
        self.history = []
