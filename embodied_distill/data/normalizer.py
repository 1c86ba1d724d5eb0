"""Per-key affine normaliser, saved with every checkpoint.

``normalize(x) = (x - offset) * scale`` and ``unnormalize(y) = y / scale + offset``, per feature.
Two modes: ``"limits"`` maps [min, max] to [-1, 1] (diffusion_policy's choice; needed by samplers
that clip to [-1, 1]), ``"gaussian"`` maps to zero mean / unit std. Features whose range (or std) is
below ``eps`` get their range floored to ``eps``: near-constant dimensions (e.g. quaternion entries
with std ~0.002) would otherwise blow small test-time deviations up into huge inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


class Normalizer:
    """Holds ``offset``/``scale`` tensors per key (e.g. ``"state"``, ``"action"``)."""

    def __init__(self, params: Mapping[str, Mapping[str, torch.Tensor]] | None = None):
        self.params: dict[str, dict[str, torch.Tensor]] = {
            k: {n: t.detach().float().cpu() for n, t in v.items()} for k, v in (params or {}).items()
        }

    @classmethod
    def fit(cls, data: Mapping[str, np.ndarray], mode: str = "limits", eps: float = 1e-2) -> Normalizer:
        """Fit on ``{key: (N, ..., D)}`` arrays, statistics over all but the last axis."""
        if mode not in ("limits", "gaussian"):
            raise ValueError(f"normalizer mode must be 'limits' or 'gaussian', got {mode!r}")
        params = {}
        for key, arr in data.items():
            x = np.asarray(arr, dtype=np.float64).reshape(-1, np.asarray(arr).shape[-1])
            if not np.isfinite(x).all():
                raise ValueError(f"cannot fit normalizer: data[{key!r}] contains NaN or inf")
            if mode == "limits":
                lo, hi = x.min(0), x.max(0)
                half = np.maximum((hi - lo) / 2, eps / 2)
                offset, scale = (hi + lo) / 2, 1.0 / half
            else:
                offset, scale = x.mean(0), 1.0 / np.maximum(x.std(0), eps)
            params[key] = {
                "offset": torch.as_tensor(offset, dtype=torch.float32),
                "scale": torch.as_tensor(scale, dtype=torch.float32),
                "min": torch.as_tensor(x.min(0), dtype=torch.float32),
                "max": torch.as_tensor(x.max(0), dtype=torch.float32),
            }
        return cls(params)

    def __contains__(self, key: str) -> bool:
        return key in self.params

    def _get(self, key: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self.params:
            raise KeyError(f"normalizer has no statistics for {key!r} (has {sorted(self.params)})")
        p = self.params[key]
        return p["offset"].to(like.device, like.dtype), p["scale"].to(like.device, like.dtype)

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D) normalised."""
        offset, scale = self._get(key, x)
        return (x - offset) * scale

    def unnormalize(self, key: str, y: torch.Tensor) -> torch.Tensor:
        """(..., D) normalised -> (..., D) in data units."""
        offset, scale = self._get(key, y)
        return y / scale + offset

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{k}.{n}": t.contiguous() for k, v in self.params.items() for n, t in v.items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> Normalizer:
        params: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in state.items():
            key, _, field = name.rpartition(".")
            params.setdefault(key, {})[field] = t
        return cls(params)

    def save(self, path: str | Path) -> None:
        save_file(self.state_dict(), str(path))

    @classmethod
    def load(cls, path: str | Path) -> Normalizer:
        return cls.from_state_dict(load_file(str(path)))
