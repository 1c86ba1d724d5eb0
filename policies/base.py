"""The Policy contract shared by students and teachers.

A policy consumes observation dicts and produces action chunks in data units::

    predict_action_chunk({"state": (B, To, Ds)}) -> (B, Ta, Da)
    select_action({"state": (B, Ds)}) -> (B, Da)     # keeps obs history + an action queue
    reset()                                          # call at every episode start

Subclasses implement ``_predict_normalized_chunk`` (normalised obs -> normalised chunk) and
``compute_loss`` (a training batch -> scalar loss + metrics). Normalisation lives in the policy and is
saved with it, so a checkpoint is self-contained.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from embodied_distill.checkpoint import load_checkpoint, save_checkpoint
from embodied_distill.data.normalizer import Normalizer
from embodied_distill.dataclass_config import dataclass_from_cfg

# name -> (module, policy class, config class); imported lazily so optional deps stay optional
POLICY_REGISTRY: dict[str, tuple[str, str, str]] = {
    "mlp": ("embodied_distill.policies.mlp.modeling_mlp", "MLPPolicy", "MLPPolicyConfig"),
    "diffusion": ("embodied_distill.policies.diffusion.modeling_diffusion", "DiffusionPolicy",
                  "DiffusionPolicyConfig"),
    "rl": ("embodied_distill.policies.rl.modeling_rl", "RLPolicy", "RLPolicyConfig"),
    "residual_rl": ("embodied_distill.policies.rl.modeling_rl", "ResidualPolicy", "ResidualPolicyConfig"),
    "compass": ("embodied_distill.policies.compass.modeling_compass", "CompassPolicy", "CompassPolicyConfig"),
    "vla": ("embodied_distill.policies.vla.modeling_vla", "VLAPolicy", "VLAPolicyConfig"),
}


@dataclasses.dataclass
class PolicyConfig:
    """Fields every policy shares."""

    obs_keys: tuple[str, ...] = ("state",)
    """Observation keys the policy reads (concatenated along the feature axis)."""
    obs_dim: int = 0
    """Total feature size of ``obs_keys``; filled in from the data when the policy is built."""
    action_dim: int = 0
    """Action size Da; filled in from the data."""
    obs_horizon: int = 2
    """To: number of most recent observations the policy sees."""
    action_horizon: int = 16
    """Ta: length of the predicted action chunk."""
    n_action_steps: int = 8
    """Actions executed open-loop from each chunk before re-planning (1 <= n_action_steps <= Ta)."""

    def __post_init__(self):
        self.obs_keys = tuple(self.obs_keys)
        if self.obs_horizon < 1 or self.action_horizon < 1:
            raise ValueError("obs_horizon and action_horizon must be >= 1")
        if not 1 <= self.n_action_steps <= self.action_horizon:
            raise ValueError(f"n_action_steps must be in [1, action_horizon={self.action_horizon}], "
                             f"got {self.n_action_steps}")


def policy_classes(name: str) -> tuple[type[Policy], type[PolicyConfig]]:
    if name not in POLICY_REGISTRY:
        raise KeyError(f"unknown policy {name!r}; available: {sorted(POLICY_REGISTRY)}")
    module, cls, cfg = POLICY_REGISTRY[name]
    mod = importlib.import_module(module)
    return getattr(mod, cls), getattr(mod, cfg)


def config_from_dict(cfg_cls: type[PolicyConfig], values: dict[str, Any]) -> PolicyConfig:
    """Build a config dataclass from a dict, ignoring Hydra keys; unknown fields are an error."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()
              if k not in ("_target_", "name")}
    return dataclass_from_cfg(cfg_cls, values, cfg_cls.__name__)


class ChunkExecutor:
    """Receding-horizon execution of action chunks, shared by every policy and the remote client.

    Keeps the last ``obs_horizon`` observations (the first one repeated at an episode start) and a queue
    of actions; ``next_action(plan)`` calls ``plan()`` -> (B, Ta, Da) only when the queue is empty and
    queues its first ``n_action_steps`` actions.
    """

    def __init__(self, obs_horizon: int, n_action_steps: int):
        self.obs_horizon, self.n_action_steps = obs_horizon, n_action_steps
        self.obs: deque[Any] = deque(maxlen=obs_horizon)
        self.actions: deque[Tensor] = deque()

    def observe(self, current: Any) -> None:
        """Append this step's observation (any object: a tensor or a dict of arrays)."""
        self.obs.append(current)
        while len(self.obs) < self.obs_horizon:
            self.obs.appendleft(current)

    def stacked(self, stack: Callable = torch.stack) -> dict[str, Any]:
        """The history of dict observations ``{key: (B, ...)}`` -> ``{key: (B, To, ...)}``
        (``stack`` = ``torch.stack`` or ``np.stack``)."""
        return {k: stack([o[k] for o in self.obs], 1) for k in self.obs[-1]}

    def next_action(self, plan: Callable[[], Tensor]) -> Tensor:
        """(B, Da): the next queued action, re-planning with ``plan() -> (B, Ta, Da)`` when empty."""
        if not self.actions:
            self.actions.extend(plan()[:, : self.n_action_steps].unbind(dim=1))
        return self.actions.popleft()

    def clear(self) -> None:
        self.obs.clear()
        self.actions.clear()


class Policy(nn.Module):
    name: str = "base"

    def __init__(self, config: PolicyConfig, normalizer: Normalizer):
        super().__init__()
        self.config = config
        self.normalizer = normalizer
        self._exec = ChunkExecutor(config.obs_horizon, config.n_action_steps)

    # ------------------------------------------------------------------ inference
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def stack_obs(self, obs: dict[str, Tensor]) -> Tensor:
        """``{key: (B, To, Dk)}`` -> normalised (B, To, Do), keys in ``config.obs_keys`` order."""
        parts = [self.normalizer.normalize(k, obs[k].to(self.device, torch.float32))
                 for k in self.config.obs_keys]
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def predict_action_chunk(self, obs: dict[str, Tensor]) -> Tensor:
        """``{key: (B, To, Dk)}`` -> (B, Ta, Da) actions in data units."""
        chunk = self._predict_normalized_chunk(self.stack_obs(obs))
        return self.normalizer.unnormalize("action", chunk)

    @torch.no_grad()
    def select_action(self, obs: dict[str, Tensor]) -> Tensor:
        """``{key: (B, Dk)}`` for the current step -> (B, Da); re-plans every ``n_action_steps``."""
        self._exec.observe({k: torch.as_tensor(obs[k]) for k in self.config.obs_keys})
        return self._exec.next_action(lambda: self.predict_action_chunk(self._exec.stacked()))

    def reset(self) -> None:
        self._exec.clear()

    # ------------------------------------------------------------------ to implement
    def _predict_normalized_chunk(self, obs: Tensor) -> Tensor:
        """(B, To, Do) normalised -> (B, Ta, Da) normalised."""
        raise NotImplementedError

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Training batch from SequenceDataset (data units) -> (scalar loss, metrics)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ persistence
    def policy_config_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{k: list(v) if isinstance(v, tuple) else v
                                      for k, v in dataclasses.asdict(self.config).items()}}

    def save_pretrained(self, path: str | Path, train_config: dict | None = None,
                        meta: dict | None = None) -> Path:
        config = {**(train_config or {}), "policy": self.policy_config_dict()}
        return save_checkpoint(path, self.state_dict(), self.normalizer, config, meta)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> Policy:
        return load_policy(path, device)[0]


def build_policy(name: str, config: PolicyConfig | dict[str, Any], normalizer: Normalizer) -> Policy:
    policy_cls, cfg_cls = policy_classes(name)
    if isinstance(config, dict):
        config = config_from_dict(cfg_cls, config)
    return policy_cls(config, normalizer)


def load_policy(path: str | Path, device: str | torch.device = "cpu") -> tuple[Policy, dict, dict]:
    """Rebuild a policy from a checkpoint directory; returns ``(policy, full_config, meta)``."""
    from embodied_distill.checkpoint import CheckpointError

    state, normalizer, config, meta = load_checkpoint(path)
    if "policy" not in config or "name" not in config["policy"]:
        raise CheckpointError(f"checkpoint {path} has no 'policy' section in config.yaml")
    policy = build_policy(config["policy"]["name"], dict(config["policy"]), normalizer)
    try:
        policy.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not match its config: {e}") from e
    return policy.to(device).eval(), config, meta
