"""Zarr episode store in diffusion_policy's layout.

Layout (zarr format 2, so diffusion_policy's ``ReplayBuffer`` can open it)::

    store.zarr/
      data/<key>          (N_total, ...) arrays, episodes concatenated along axis 0
      meta/episode_ends   (E,) int64, exclusive end index of each episode in data/*
      meta/<key>          (E, ...) optional per-episode values (seed, instruction, ...)
      .zattrs             free-form attributes (who generated the data, with which settings)

Appends are whole-episode and crash-safe: the data arrays are grown and written first, and
``meta/episode_ends`` is extended last. A crash in between leaves rows past ``episode_ends[-1]``
that no reader sees and that the next append overwrites, so a half episode is never visible.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

_CHUNK_ROWS = 1024


def _open_group(path: str | Path, mode: str):
    try:  # zarr >= 3: keep writing format 2 for diffusion_policy compatibility
        return zarr.open_group(str(path), mode=mode, zarr_format=2)
    except TypeError:  # zarr 2.x has no zarr_format argument and always writes format 2
        return zarr.open_group(str(path), mode=mode)


def _create(group, name: str, shape: tuple[int, ...], dtype, chunks: tuple[int, ...]):
    create = getattr(group, "create_array", None) or group.create_dataset
    fill = "" if np.dtype(dtype).kind == "U" else 0
    return create(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=fill)


class EpisodeStore:
    """Append-only store of whole episodes.

    Args:
        path: directory of the zarr store; created when ``mode`` allows it.
        mode: ``"a"`` (read/write, create if missing) or ``"r"`` (read only).
    """

    def __init__(self, path: str | Path, mode: str = "a"):
        if mode not in ("a", "r"):
            raise ValueError(f"mode must be 'a' or 'r', got {mode!r}")
        self.path = Path(path)
        if mode == "r" and not self.path.exists():
            raise FileNotFoundError(f"no episode store at {self.path}")
        self.mode = mode
        self.root = _open_group(self.path, mode)
        if mode == "a":
            self.root.require_group("data")
            meta = self.root.require_group("meta")
            if "episode_ends" not in meta:
                _create(meta, "episode_ends", (0,), np.int64, (_CHUNK_ROWS,))
        elif "meta" not in self.root or "episode_ends" not in self.root["meta"]:
            raise ValueError(f"{self.path} is not an episode store (no meta/episode_ends)")

    # ------------------------------------------------------------------ reading
    @property
    def episode_ends(self) -> np.ndarray:
        """(E,) int64 exclusive end index of each committed episode.

        Only the longest strictly increasing prefix counts: a crash between growing
        ``episode_ends`` and writing its new entry leaves a fill value (0) that is not an episode.
        """
        ends = np.asarray(self.root["meta"]["episode_ends"][:], dtype=np.int64)
        prev = np.concatenate([[0], ends[:-1]])
        bad = np.flatnonzero(ends <= prev)
        return ends[: bad[0]] if len(bad) else ends

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ends)

    @property
    def n_steps(self) -> int:
        ends = self.episode_ends
        return int(ends[-1]) if len(ends) else 0

    @property
    def keys(self) -> list[str]:
        return sorted(self.root["data"].array_keys())

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.root.attrs)

    def set_attrs(self, **attrs: Any) -> None:
        self.root.attrs.update(attrs)

    def episode_slice(self, i: int) -> slice:
        ends = self.episode_ends
        if not -len(ends) <= i < len(ends):
            raise IndexError(f"episode {i} out of range ({len(ends)} episodes)")
        i = i % len(ends)
        start = 0 if i == 0 else int(ends[i - 1])
        return slice(start, int(ends[i]))

    def get_episode(self, i: int, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        """Arrays of episode ``i``: ``{key: (T, ...)}``."""
        sl = self.episode_slice(i)
        return {k: np.asarray(self.root["data"][k][sl]) for k in (keys or self.keys)}

    def episode_meta(self, key: str) -> np.ndarray:
        """(E, ...) per-episode values stored under ``meta/<key>``."""
        return np.asarray(self.root["meta"][key][: self.n_episodes])

    def load(self, keys: list[str] | None = None) -> dict[str, np.ndarray]:
        """All committed rows of ``keys`` as numpy arrays (rows past the last episode end are dropped)."""
        n = self.n_steps
        return {k: np.asarray(self.root["data"][k][:n]) for k in (keys or self.keys)}

    def __len__(self) -> int:
        return self.n_episodes

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(self.n_episodes):
            yield self.get_episode(i)

    # ------------------------------------------------------------------ writing
    def add_episode(self, data: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> int:
        """Append one whole episode; returns its index.

        Args:
            data: ``{key: (T, ...)}`` arrays, all with the same length T >= 1. The first episode fixes
                the keys, trailing shapes and dtypes; later episodes must match.
            meta: optional per-episode scalars or small arrays (e.g. ``seed``, ``instruction``).
        """
        if self.mode != "a":
            raise PermissionError("store opened read-only")
        lengths = {k: len(v) for k, v in data.items()}
        if not data or len(set(lengths.values())) != 1 or next(iter(lengths.values())) == 0:
            raise ValueError(f"an episode needs keys with one common non-zero length, got {lengths}")
        length = next(iter(lengths.values()))
        group = self.root["data"]
        existing = set(group.array_keys())
        if self.n_episodes > 0 and existing != set(data):
            raise ValueError(f"episode keys {sorted(data)} differ from the store's {sorted(existing)}")
        start = self.n_steps
        for key, value in data.items():
            value = np.asarray(value)
            if key not in existing:
                arr = _create(group, key, (0, *value.shape[1:]), value.dtype,
                              (_CHUNK_ROWS, *value.shape[1:]))
            else:
                arr = group[key]
                if arr.shape[1:] != value.shape[1:]:
                    raise ValueError(f"data/{key}: shape {value.shape[1:]} != stored {arr.shape[1:]}")
            arr.resize((start + length, *value.shape[1:]))  # also drops rows of a crashed append
            arr[start:start + length] = value.astype(arr.dtype, copy=False)
        meta_group = self.root["meta"]
        n = self.n_episodes
        for key, value in (meta or {}).items():
            value = np.asarray(value)
            if value.dtype.kind == "U":
                value = value.astype("<U256")
            if key not in meta_group:
                if n > 0:
                    raise ValueError(f"meta/{key} is new but {n} episodes exist without it")
                _create(meta_group, key, (0, *value.shape), value.dtype, (_CHUNK_ROWS, *value.shape))
            arr = meta_group[key]
            arr.resize((n + 1, *arr.shape[1:]))
            arr[n] = value
        ends = meta_group["episode_ends"]
        # The commit point. Until ends[n] holds a value above ends[n-1] the episode is invisible.
        ends.resize((n + 1,))
        ends[n] = start + length
        return n
