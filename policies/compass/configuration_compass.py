"""Configuration of the embodiment-agnostic COMPASS policy (IL base and generalist share it)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from embodied_distill.policies.base import PolicyConfig

EMBEDDINGS = ("onehot", "learned")


@dataclasses.dataclass
class CompassPolicyConfig(PolicyConfig):
    """One network for several robots whose state and action sizes differ.

    Each embodiment's state ``(Ds_e,)`` is normalised with its own statistics (normaliser key
    ``state/<name>``), zero-padded to ``max_obs_dim`` and concatenated with an embodiment code (a one-hot
    of width ``max_embodiments`` or a learned embedding); the network predicts a Gaussian over
    ``max_action_dim`` normalised action dims, of which the first ``Da_e`` belong to embodiment ``e``
    (the rest are masked: zero mean, never scored). A new robot joins by adding an entry to
    ``embodiments`` (within ``max_embodiments`` / the padded widths, the layer sizes do not change).
    """

    embodiments: tuple[dict[str, Any], ...] = ()
    """``({"name": str, "obs_dim": int, "action_dim": int, "action_relative_to_state": bool}, ...)`` in
    code order (index = one-hot slot). ``action_relative_to_state`` (default false): the network predicts
    the action minus the first ``action_dim`` state features (absolute joint targets as offsets from the
    joint positions, which the state starts with)."""
    embodiment: str = ""
    """The embodiment this instance acts as in ``predict_action_chunk`` / ``select_action``
    (default: the first). Training batches carry their own embodiment indices."""
    max_obs_dim: int = 0
    """Padded state width (0: the largest ``obs_dim``); may exceed it to leave room for new robots."""
    max_action_dim: int = 0
    """Padded action width (0: the largest ``action_dim``)."""
    max_embodiments: int = 0
    """Width of the one-hot code / rows of the embedding table (0: ``len(embodiments)``)."""
    embedding: str = "onehot"
    """Embodiment code: ``onehot`` (COMPASS) or ``learned`` (an ``nn.Embedding``)."""
    embedding_dim: int = 16
    """Size of the learned embedding (``embedding=learned`` only)."""
    hidden_dims: tuple[int, ...] = (256, 256, 256)
    """Hidden widths of the MLP (LayerNorm + Mish after each)."""
    log_std_init: float = math.log(0.1)
    """Initial value of the learnable log std (COMPASS: sigma = 0.1), in normalised action units."""
    std_per_embodiment: bool = False
    """False: one global learnable std per padded action dim, shared by every robot (COMPASS). True: one
    row per embodiment. Robots whose specialists explore at very different normalised scales (a
    joint-position arm beside an end-effector arm) pull a shared std to the widest one, and the KL then
    fits the narrow robot's means ~1/sigma^2 more weakly."""
    obs_horizon: int = 1
    """To: states the policy reads (1: the current state)."""
    action_horizon: int = 1
    """Ta: one Gaussian action per step (the distillation target is a per-step Gaussian)."""
    n_action_steps: int = 1
    """Closed loop."""

    def __post_init__(self):
        super().__post_init__()
        self.embodiments = tuple(dict(e) for e in self.embodiments)
        self.hidden_dims = tuple(self.hidden_dims)
        if not self.embodiments:
            raise ValueError("CompassPolicyConfig needs at least one embodiment")
        names = [e.get("name") for e in self.embodiments]
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"embodiment names must be unique non-empty strings, got {names}")
        for e in self.embodiments:
            if int(e.get("obs_dim", 0)) < 1 or int(e.get("action_dim", 0)) < 1:
                raise ValueError(f"embodiment {e.get('name')!r} needs obs_dim >= 1 and action_dim >= 1: {e}")
        self.max_obs_dim = self.max_obs_dim or max(int(e["obs_dim"]) for e in self.embodiments)
        self.max_action_dim = self.max_action_dim or max(int(e["action_dim"]) for e in self.embodiments)
        self.max_embodiments = self.max_embodiments or len(self.embodiments)
        too_big = [e["name"] for e in self.embodiments
                   if e["obs_dim"] > self.max_obs_dim or e["action_dim"] > self.max_action_dim]
        if too_big:
            raise ValueError(f"embodiments {too_big} exceed max_obs_dim={self.max_obs_dim} / "
                             f"max_action_dim={self.max_action_dim}")
        if len(self.embodiments) > self.max_embodiments:
            raise ValueError(f"{len(self.embodiments)} embodiments but "
                             f"max_embodiments={self.max_embodiments}")
        self.embodiment = self.embodiment or names[0]
        if self.embodiment not in names:
            raise ValueError(f"embodiment {self.embodiment!r} is not one of {names}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
        if self.embedding_dim < 1 or not self.hidden_dims or min(self.hidden_dims) < 1:
            raise ValueError("embedding_dim and hidden_dims must be positive")
        if self.obs_horizon != 1 or self.action_horizon != 1 or self.n_action_steps != 1:
            raise ValueError("the COMPASS policy reads one state and acts one step at a time "
                             "(obs_horizon = action_horizon = n_action_steps = 1)")
        if not -10.0 <= self.log_std_init <= 2.0:
            raise ValueError(f"log_std_init must be in [-10, 2], got {self.log_std_init}")
        spec = self.spec(self.embodiment)
        self.obs_dim, self.action_dim = int(spec["obs_dim"]), int(spec["action_dim"])

    @property
    def names(self) -> list[str]:
        return [e["name"] for e in self.embodiments]

    def index(self, name: str) -> int:
        """Code slot of embodiment ``name``."""
        if name not in self.names:
            raise KeyError(f"unknown embodiment {name!r}; have {self.names}")
        return self.names.index(name)

    def spec(self, name: str) -> dict[str, Any]:
        return self.embodiments[self.index(name)]
