"""Sequence sampler: windows of To observations and Ta actions with padding at episode edges.

For a window anchored at step t of an episode of length T, observations are steps
``t-To+1 .. t`` and actions are steps ``t .. t+Ta-1`` (diffusion_policy's convention with the
current observation last). Indices before 0 repeat the first step and indices past T-1 repeat the
last one; ``action_is_pad`` marks padded actions so losses can mask them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class SequenceDataset(Dataset):
    """Windows over concatenated episodes.

    Args:
        data: ``{key: (N, ...)}`` arrays concatenated over episodes (e.g. from ``EpisodeStore.load``).
            uint8 arrays (images) stay uint8, other numbers become float32; string arrays (N,) are text
            observations (e.g. the instruction of each step).
        episode_ends: (E,) exclusive end indices.
        obs_keys: keys stacked over the obs horizon (each item gets ``(To, D)``); a text key gets the
            string of the window's current step (no time axis), a batch a list of B strings.
        action_key: key of the actions (each item gets ``(Ta, Da)``).
        obs_horizon: To >= 1.  action_horizon: Ta >= 1.
        start_steps, start_repeat: the windows at the first ``start_steps`` steps of every episode appear
            ``start_repeat`` times in the index, so uniform draws see them ``start_repeat`` times as often
            (the steps where only the instruction tells a multi-task policy which object to go for; later
            the arm's own motion gives it away). 0 / 1: every window once.
    """

    def __init__(self, data: dict[str, np.ndarray], episode_ends: np.ndarray, obs_keys: list[str],
                 action_key: str = "action", obs_horizon: int = 2, action_horizon: int = 8,
                 start_steps: int = 0, start_repeat: int = 1):
        if obs_horizon < 1 or action_horizon < 1:
            raise ValueError("obs_horizon and action_horizon must be >= 1")
        if start_steps < 0 or start_repeat < 1:
            raise ValueError(f"need start_steps >= 0, start_repeat >= 1, got {start_steps}, {start_repeat}")
        arrays = {k: np.asarray(data[k]) for k in [*obs_keys, action_key]}
        self.text = {k: a for k, a in arrays.items() if a.dtype.kind in "OUS"}
        self.data = {k: torch.as_tensor(a, dtype=torch.uint8 if a.dtype == np.uint8 else torch.float32)
                     for k, a in arrays.items() if k not in self.text}
        self.obs_keys, self.action_key = list(obs_keys), action_key
        self.to, self.ta = obs_horizon, action_horizon
        ends = np.asarray(episode_ends, dtype=np.int64)
        starts = np.concatenate([[0], ends[:-1]])
        self.index = np.concatenate([np.stack([np.arange(s, e), np.full(e - s, s), np.full(e - s, e)], 1)
                                     for s, e in zip(starts, ends)]) if len(ends) else np.zeros((0, 3), int)
        if start_steps and start_repeat > 1:
            early = self.index[self.index[:, 0] - self.index[:, 1] < start_steps]
            self.index = np.concatenate([self.index, np.tile(early, (start_repeat - 1, 1))])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.get_batch(torch.tensor([i])).items()}

    def get_batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Vectorised gather of windows ``indices`` (B,) -> obs keys (B, To, D) (text keys: B strings),
        action (B, Ta, Da), ``action_is_pad`` (B, Ta) bool. Much faster than a DataLoader over
        ``__getitem__``."""
        rows = torch.as_tensor(self.index[np.asarray(indices)]).long().reshape(-1, 3)
        t, start, end = rows[:, :1], rows[:, 1:2], rows[:, 2:3]
        obs_idx = torch.maximum(t + torch.arange(-self.to + 1, 1), start)
        act_raw = t + torch.arange(self.ta)
        act_idx = torch.minimum(act_raw, end - 1)
        now = t[:, 0].numpy()
        batch = {k: self.data[k][obs_idx] if k in self.data else [str(x) for x in self.text[k][now]]
                 for k in self.obs_keys}
        batch[self.action_key] = self.data[self.action_key][act_idx]
        batch["action_is_pad"] = act_raw >= end
        return batch
