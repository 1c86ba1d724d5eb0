"""Per-dimension uniform action tokenizer (OpenVLA, https://arxiv.org/abs/2406.09246, section 3.2).

Every dimension of a *normalised* action in ``[low, high]`` is cut into ``n_bins`` equal bins; a value
becomes the index of its bin and a token decodes to the bin's centre, so a round trip moves a value by
at most half a bin width ``(high - low) / (2 n_bins)``. Values outside the range are clipped first.
(OpenVLA itself decodes 256 bins to the 255 midpoints of 256 edges; here bin ``i`` decodes to the
centre of bin ``i``, which keeps the half-bin bound at both ends.)
"""

from __future__ import annotations

import torch
from torch import Tensor


class ActionTokenizer:
    """``encode((..., Da) float) -> (..., Da) long`` in ``[0, n_bins)``; ``decode`` -> bin centres.

    Args:
        n_bins: bins per action dimension (OpenVLA: 256).
        low, high: the normalised action range the bins cover (``low < high``).
    """

    def __init__(self, n_bins: int = 256, low: float = -1.0, high: float = 1.0):
        if n_bins < 2:
            raise ValueError(f"n_bins must be >= 2, got {n_bins}")
        if not low < high:
            raise ValueError(f"need low < high, got low={low}, high={high}")
        self.n_bins, self.low, self.high = int(n_bins), float(low), float(high)
        self.bin_width = (self.high - self.low) / self.n_bins

    def encode(self, actions: Tensor) -> Tensor:
        """(..., Da) normalised actions -> (..., Da) long tokens in ``[0, n_bins)``."""
        if not torch.is_floating_point(actions):
            raise TypeError(f"encode takes float actions, got {actions.dtype}")
        if not torch.isfinite(actions).all():
            raise ValueError("cannot tokenize non-finite actions")
        x = (actions.clamp(self.low, self.high) - self.low) / self.bin_width
        return x.floor().long().clamp_(0, self.n_bins - 1)

    def decode(self, tokens: Tensor) -> Tensor:
        """(..., Da) long tokens -> (..., Da) float32 bin centres."""
        if torch.is_floating_point(tokens):
            raise TypeError(f"decode takes integer tokens, got {tokens.dtype}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.n_bins):
            raise ValueError(f"tokens must lie in [0, {self.n_bins}), got [{int(tokens.min())}, "
                             f"{int(tokens.max())}]")
        return self.low + (tokens.float() + 0.5) * self.bin_width

    def bin_centers(self, device: torch.device | str | None = None) -> Tensor:
        """(n_bins,) float32 centres of all bins (``decode(arange(n_bins))``)."""
        idx = torch.arange(self.n_bins, device=device, dtype=torch.float32)
        return self.low + (idx + 0.5) * self.bin_width

    def __repr__(self) -> str:
        return f"ActionTokenizer(n_bins={self.n_bins}, low={self.low}, high={self.high})"


def sample_tokens(logits: Tensor, temperature: float = 0.0,
                  generator: torch.Generator | None = None) -> Tensor:
    """(..., n_bins) logits -> (...) long tokens: the argmax at temperature 0, otherwise one draw from
    ``softmax(logits / temperature)`` per position (``generator`` makes it reproducible)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    draws = torch.multinomial(probs.reshape(-1, logits.shape[-1]), 1, generator=generator)
    return draws.view(logits.shape[:-1])
