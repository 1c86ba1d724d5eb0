"""Configuration of the RL students: a Gaussian actor-critic and a residual policy on a frozen base."""

from __future__ import annotations

import dataclasses
from typing import Any

from embodied_distill.policies.base import PolicyConfig

ACTIVATIONS = ("tanh", "relu", "mish")


@dataclasses.dataclass
class RLPolicyConfig(PolicyConfig):
    """Gaussian actor-critic over a flat observation layout.

    The network input is ``[s_{t-H+1}, ..., s_t, extra]`` flattened, with ``H = obs_horizon`` frames of
    ``obs_dim`` features (the Policy base class keeps that history) and ``extra_dim`` extra features
    (the base action for residual policies). The networks read the last ``net_obs_horizon`` frames (the
    env may carry a longer history for a teacher that needs one) plus the extra features.
    """

    obs_horizon: int = 1
    """H: frames carried in the observation layout (>= net_obs_horizon; a teacher may need more)."""
    action_horizon: int = 1
    """RL students act one step at a time (Ta = 1)."""
    n_action_steps: int = 1
    """Closed loop: one action per prediction."""
    net_obs_horizon: int = 1
    """Frames the actor and critic read (the most recent ones), 1 <= net_obs_horizon <= obs_horizon."""
    extra_dim: int = 0
    """Extra features after the frames (residual policies: the base action, Da)."""
    hidden_dims: tuple[int, ...] = (256, 256)
    """Widths of the actor's and the critic's hidden layers (separate networks)."""
    activation: str = "tanh"
    """Hidden activation: tanh | relu | mish."""
    log_std_init: float = -0.5
    """Initial log standard deviation of the state-independent Gaussian (one per action dimension)."""
    zero_init_mean: bool = False
    """Zero the mean head's last layer (residual policies start as exactly their base)."""
    action_low: float = -1.0
    """Lower action bound (deterministic actions are clipped to [action_low, action_high])."""
    action_high: float = 1.0
    """Upper action bound."""
    image_shape: tuple[int, ...] | None = None
    """Optional (C, H, W) uint8 image appended after ``extra`` in the flat layout; encoded by a small CNN
    into ``image_features`` features before the MLPs. None: state-only."""
    image_features: int = 64
    """Output size of the image encoder."""
    normalize_obs: bool = True
    """Standardise states with running statistics (buffers saved with the weights; updated by the
    learner from each rollout, after the update)."""
    obs_clip: float = 5.0
    """Clip standardised states to +-obs_clip."""

    def __post_init__(self):
        super().__post_init__()
        self.hidden_dims = tuple(self.hidden_dims)
        if self.image_shape is not None:
            self.image_shape = tuple(self.image_shape)
            if len(self.image_shape) != 3 or min(self.image_shape) < 1:
                raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {self.image_shape}")
        if self.action_horizon != 1 or self.n_action_steps != 1:
            raise ValueError("RL policies act one step at a time: action_horizon = n_action_steps = 1")
        if not 1 <= self.net_obs_horizon <= self.obs_horizon:
            raise ValueError(f"net_obs_horizon must be in [1, obs_horizon={self.obs_horizon}], "
                             f"got {self.net_obs_horizon}")
        if self.extra_dim < 0:
            raise ValueError("extra_dim must be >= 0")
        if not self.hidden_dims or min(self.hidden_dims) < 1:
            raise ValueError(f"hidden_dims must be positive widths, got {self.hidden_dims}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not -10.0 <= self.log_std_init <= 2.0:
            raise ValueError(f"log_std_init must be in [-10, 2], got {self.log_std_init}")
        if not self.action_low < self.action_high:
            raise ValueError("action_low must be < action_high")
        if self.image_features < 1:
            raise ValueError("image_features must be >= 1")
        if self.obs_clip <= 0:
            raise ValueError("obs_clip must be > 0")

    @property
    def flat_dim(self) -> int:
        """Size of the flat observation layout the network consumes."""
        image = 0 if self.image_shape is None else int(self.image_shape[0] * self.image_shape[1]
                                                        * self.image_shape[2])
        return self.obs_horizon * self.obs_dim + self.extra_dim + image


@dataclasses.dataclass
class ResidualPolicyConfig(RLPolicyConfig):
    """A frozen base policy plus a zero-initialised Gaussian residual:
    ``a = clip(base(obs) + residual_scale * residual([obs, base(obs)]))``."""

    base_policy: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The base policy's own config (``Policy.policy_config_dict()``, with its ``name``); its weights are
    saved with the residual policy, its normaliser is the checkpoint's normaliser."""
    residual_scale: float = 0.25
    """Multiplier on the residual head's output (bounds how far the residual can move the base)."""
    zero_init_mean: bool = True
    """Residual policies start exactly as their base."""
    log_std_init: float = -1.0
    """Smaller initial exploration noise than a from-scratch student (it is scaled by residual_scale)."""

    def __post_init__(self):
        super().__post_init__()
        if "name" not in self.base_policy:
            raise ValueError("base_policy must be a policy config dict with a 'name' (a registered policy)")
        if not 0.0 < self.residual_scale <= 2.0:
            raise ValueError(f"residual_scale must be in (0, 2], got {self.residual_scale}")
