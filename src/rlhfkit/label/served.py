"""The models the labelling app serves: each loaded once with its revision (a hash of its weights), sampled one
call at a time; the generation settings are stored with every response."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhfkit.rollout import EngineConfig


@dataclass(frozen=True)
class Generation:
    """How the served models sample; stored with every response."""

    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 256
    rank_k: int = 4


def model_revision(name: str) -> str:
    """A short hash of the weights and config (so records tell checkpoints of one name apart)."""
    from rlhfkit import models

    src = models.resolve(name)
    if src.path is None:
        return "random-init-seed0"
    path = Path(src.path)
    if not path.is_dir():
        return "hub"
    digest = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("config.json")):
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:12]


class Models:
    """The served models, sampled one call at a time (an engine is not thread-safe)."""

    def __init__(self, names: list[str], batch_size: int = 8, engine: EngineConfig | None = None):
        self.names = list(names)
        self.engines, self.revisions = {}, {}
        if names:
            from rlhfkit import UsageError, models
            from rlhfkit.rollout import EngineConfig, engine_kind, make_engine

            engine = engine or EngineConfig(engine="hf")
            if len(names) > 1 and engine_kind(engine) == "vllm":
                raise UsageError("--engine vllm serves one --model per process (each vLLM engine takes its own "
                                 "share of the machine); serve several with --engine hf")
            for name in names:
                tok = models.load_tokenizer(name)
                self.engines[name] = make_engine(engine, models.load_causal_lm(name, tokenizer=tok), tok, batch_size,
                                                 "no")
                self.revisions[name] = model_revision(name)

    def sample(self, context: list[dict], picks: list[str], gen: Generation) -> list[tuple[str, str, dict, str]]:
        """One response per entry of `picks` (model names), in that order: (model, revision, settings, text).
        Each model samples all of its responses in one batched call; settings record the seed and the sample's
        index, which together fix the sample (see rlhfkit.rollout)."""
        from rlhfkit.rollout import SamplingParams

        out: list = [None] * len(picks)
        for name in dict.fromkeys(picks):
            slots = [i for i, p in enumerate(picks) if p == name]
            params = SamplingParams(n=len(slots), temperature=gen.temperature, top_p=gen.top_p,
                                    max_new_tokens=gen.max_new_tokens, seed=random.randrange(2**31))
            texts = self.engines[name].generate([context], params).texts
            for j, (slot, text) in enumerate(zip(slots, texts)):
                settings = {"temperature": params.temperature, "top_p": params.top_p,
                            "max_new_tokens": params.max_new_tokens, "seed": params.seed, "sample_index": j}
                out[slot] = (name, self.revisions[name], settings, text)
        return out
