"""Gaussian actor-critic (state MLP, optional image encoder) and a residual policy on a frozen base.

Shapes: the flat observation layout is ``(B, F)`` with ``F = config.flat_dim`` =
``H * Ds`` (the last H states, oldest first) ``+ extra_dim`` (residual: the base action) ``+ C*H*W``
(optional image). The actor gives the Gaussian mean ``(B, Da)`` and a state-independent log-std
``(Da,)``; the critic gives ``V(s)`` ``(B,)``.

Both classes implement the Policy contract (``predict_action_chunk({"state": (B, To, Ds)}) ->
(B, 1, Da)`` with the deterministic mean action, ``select_action``, ``reset``, save/load), so an RL
student is evaluated and reloaded like any other checkpoint. :func:`sb3_policy_class` lets
stable-baselines3's PPO drive the same module during training.
"""

from __future__ import annotations

import functools

import torch
from embodied_distill.policies.base import Policy, build_policy
from embodied_distill.policies.rl.configuration_rl import ResidualPolicyConfig, RLPolicyConfig
from torch import Tensor, nn

from embodied_distill.data.normalizer import Normalizer

__all__ = ["GaussianActorCritic", "RLPolicy", "ResidualPolicy", "RLPolicyConfig", "ResidualPolicyConfig",
           "identity_normalizer", "sb3_policy_class", "stack_history"]

_ACT = {"tanh": nn.Tanh, "relu": nn.ReLU, "mish": nn.Mish}


def _mlp(width: int, hidden: tuple[int, ...], out: int, activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, h), _ACT[activation]()]
        width = h
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


class ConvEncoder(nn.Module):
    """uint8 images ``(B, C, H, W)`` (values 0..255) -> features ``(B, out)``: 3 strided convs + linear."""

    def __init__(self, shape: tuple[int, ...], out: int):
        super().__init__()
        c, h, w = shape
        self.shape = (c, h, w)
        self.conv = nn.Sequential(nn.Conv2d(c, 16, 5, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2),
                                  nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            n = self.conv(torch.zeros(1, c, h, w)).shape[-1]
        self.proj = nn.Sequential(nn.Linear(n, out), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.conv(x.reshape(-1, *self.shape) / 255.0))


class GaussianActorCritic(nn.Module):
    """Separate actor and critic MLPs on the flat layout; state-independent log-std.

    ``forward(x (B, F)) -> (mean (B, Da), log_std (Da,), value (B,))``.
    """

    def __init__(self, config: RLPolicyConfig):
        super().__init__()
        if config.obs_dim < 1 or config.action_dim < 1:
            raise ValueError("obs_dim and action_dim must be set (>= 1) before building the policy")
        self.config = config
        c = config
        self.encoder = ConvEncoder(c.image_shape, c.image_features) if c.image_shape is not None else None
        width = c.net_obs_horizon * c.obs_dim + c.extra_dim + (c.image_features if self.encoder else 0)
        self.actor = _mlp(width, c.hidden_dims, c.action_dim, c.activation)
        self.critic = _mlp(width, c.hidden_dims, 1, c.activation)
        self.log_std = nn.Parameter(torch.full((c.action_dim,), float(c.log_std_init)))
        self.register_buffer("obs_mean", torch.zeros(c.obs_dim))
        self.register_buffer("obs_var", torch.ones(c.obs_dim))
        self.register_buffer("obs_count", torch.zeros(()))
        head = self.actor[-1]
        with torch.no_grad():  # small (or zero) initial mean: the policy starts near its prior
            head.weight.mul_(0.0 if c.zero_init_mean else 0.01)
            head.bias.zero_()

    def features(self, x: Tensor) -> Tensor:
        """(B, F) flat layout -> (B, W) network input (last net_obs_horizon frames, extra, image code)."""
        c = self.config
        if x.shape[-1] != c.flat_dim:
            raise ValueError(f"expected a flat observation of {c.flat_dim} features, got {x.shape[-1]}")
        hist = c.obs_horizon * c.obs_dim
        frames = x[:, (c.obs_horizon - c.net_obs_horizon) * c.obs_dim: hist]
        if c.normalize_obs:
            frames = frames.reshape(x.shape[0], c.net_obs_horizon, c.obs_dim)
            frames = ((frames - self.obs_mean) * (self.obs_var + 1e-8).rsqrt()).clamp(-c.obs_clip, c.obs_clip)
            frames = frames.flatten(1)
        parts = [frames, x[:, hist: hist + c.extra_dim]]
        if self.encoder is not None:
            parts.append(self.encoder(x[:, hist + c.extra_dim:]))
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def update_obs_stats(self, states: Tensor) -> None:
        """Merge a batch of states (N, Ds) into the running mean/variance (parallel Welford)."""
        states = states.reshape(-1, self.config.obs_dim).to(self.obs_mean)
        n, mean, var = states.shape[0], states.mean(0), states.var(0, unbiased=False)
        total = self.obs_count + n
        delta = mean - self.obs_mean
        m2 = self.obs_var * self.obs_count + var * n + delta.square() * self.obs_count * n / total
        self.obs_mean.add_(delta * n / total)
        self.obs_var.copy_(m2 / total)
        self.obs_count.copy_(total)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.features(x.float())
        return self.actor(h), self.log_std, self.critic(h).squeeze(-1)


def identity_normalizer(obs_dim: int, action_dim: int) -> Normalizer:
    """A normaliser that leaves states and actions unchanged (RL students work in env units)."""
    ident = {"offset": torch.zeros(1), "scale": torch.ones(1)}
    return Normalizer({"state": {k: v.expand(obs_dim).clone() for k, v in ident.items()},
                       "action": {k: v.expand(action_dim).clone() for k, v in ident.items()}})


def stack_history(states: Tensor, horizon: int) -> Tensor:
    """(B, To, Ds) -> (B, horizon * Ds): the last ``horizon`` frames, the first one repeated if To is
    shorter (as the Policy base class pads at episode start)."""
    if states.dim() != 3:
        raise ValueError(f"expected states of shape (B, To, Ds), got {tuple(states.shape)}")
    if states.shape[1] < horizon:
        pad = states[:, :1].expand(-1, horizon - states.shape[1], -1)
        states = torch.cat([pad, states], dim=1)
    return states[:, -horizon:].flatten(1)


class RLPolicy(Policy):
    """A Gaussian actor-critic student. ``predict_action_chunk`` returns the clipped mean ``(B, 1, Da)``."""

    name = "rl"

    def __init__(self, config: RLPolicyConfig, normalizer: Normalizer | None = None):
        super().__init__(config, normalizer or identity_normalizer(config.obs_dim, config.action_dim))
        if config.extra_dim != 0:
            raise ValueError("RLPolicy reads states only (extra_dim must be 0; see ResidualPolicy)")
        if config.image_shape is not None:
            raise ValueError("RLPolicy's Policy contract is state-only; image students are built by "
                             "GaussianActorCritic directly")
        self.actor_critic = GaussianActorCritic(config)

    @torch.no_grad()
    def predict_action_chunk(self, obs: dict[str, Tensor]) -> Tensor:
        """``{"state": (B, To, Ds)}`` -> (B, 1, Da) deterministic (mean) actions, clipped to the bounds."""
        x = stack_history(obs["state"].to(self.device, torch.float32), self.config.obs_horizon)
        mean = self.actor_critic(x)[0]
        return mean.clamp(self.config.action_low, self.config.action_high).unsqueeze(1)


class ResidualPolicy(Policy):
    """``a = clip(base(obs) + residual_scale * mean_residual([obs history, base action]))``.

    The base is frozen (its weights are saved with the residual); ``select_action`` drives the base's own
    ``select_action`` so it sees its proper observation history, exactly as the training env wrapper
    (:class:`embodied_distill.policies.rl.envs.ManiSkillRLEnv`) does.
    """

    name = "residual_rl"

    def __init__(self, config: ResidualPolicyConfig, normalizer: Normalizer):
        super().__init__(config, normalizer)
        if config.extra_dim != config.action_dim:
            raise ValueError(f"a residual policy reads the base action: extra_dim must equal "
                             f"action_dim={config.action_dim}, got {config.extra_dim}")
        base_cfg = dict(config.base_policy)
        self.base = build_policy(base_cfg.pop("name"), base_cfg, normalizer)
        self.base.requires_grad_(False)
        self.actor_critic = GaussianActorCritic(config)

    def train(self, mode: bool = True) -> ResidualPolicy:
        super().train(mode)
        self.base.eval()  # frozen: never in training mode (dropout etc.)
        return self

    def combine(self, base_action: Tensor, flat: Tensor) -> Tensor:
        """base action (B, Da) + flat layout (B, F) -> executed action (B, Da) (deterministic residual)."""
        mean = self.actor_critic(flat)[0]
        a = base_action + self.config.residual_scale * mean
        return a.clamp(self.config.action_low, self.config.action_high)

    @torch.no_grad()
    def predict_action_chunk(self, obs: dict[str, Tensor]) -> Tensor:
        """``{"state": (B, To, Ds)}`` -> (B, 1, Da); the base re-plans from the same history."""
        states = obs["state"].to(self.device, torch.float32)
        base_action = self.base.predict_action_chunk({"state": states})[:, 0]
        flat = torch.cat([stack_history(states, self.config.obs_horizon), base_action], dim=-1)
        return self.combine(base_action, flat).unsqueeze(1)

    @torch.no_grad()
    def select_action(self, obs: dict[str, Tensor]) -> Tensor:
        """``{"state": (B, Ds)}`` -> (B, Da); the base keeps its own history and action queue."""
        current = torch.as_tensor(obs["state"]).to(self.device, torch.float32)
        base_action = self.base.select_action({"state": current}).to(self.device, torch.float32)
        self._exec.observe(current)
        flat = torch.cat([torch.stack(list(self._exec.obs), 1).flatten(1), base_action], dim=-1)
        return self.combine(base_action, flat)

    def reset(self) -> None:
        super().reset()
        self.base.reset()


@functools.cache
def sb3_policy_class():
    """Build the SB3 policy class lazily (stable-baselines3 is imported only when RL is used)."""
    try:
        from stable_baselines3.common.distributions import DiagGaussianDistribution
        from stable_baselines3.common.policies import ActorCriticPolicy
    except ImportError as e:  # pragma: no cover
        raise ImportError("RL students need stable-baselines3: pip install stable-baselines3") from e

    class _SB3GaussianPolicy(ActorCriticPolicy):
        """stable-baselines3 ActorCriticPolicy around a given :class:`GaussianActorCritic`.

        ``policy_kwargs={"actor_critic": module}``: SB3's PPO samples, scores and optimises ``module``
        itself, so the Policy-contract student that holds the same module sees every update.
        """

        def __init__(self, observation_space, action_space, lr_schedule, actor_critic=None, **kwargs):
            if not isinstance(actor_critic, GaussianActorCritic):
                raise TypeError("SB3GaussianPolicy needs policy_kwargs={'actor_critic': GaussianActorCritic}")
            self._given = [actor_critic]  # a plain list: nn.Module is not initialised yet
            kwargs.pop("use_sde", None)
            super().__init__(observation_space, action_space, lr_schedule, **kwargs)

        def _build(self, lr_schedule) -> None:
            self.model = self._given.pop()
            self.action_dist = DiagGaussianDistribution(int(self.action_space.shape[0]))
            self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1),
                                                  **self.optimizer_kwargs)

        def distribution(self, obs: Tensor):
            """(B, F) -> (SB3 DiagGaussianDistribution, mean (B, Da), log_std (Da,), value (B,))."""
            mean, log_std, value = self.model(obs.float())
            return self.action_dist.proba_distribution(mean, log_std), mean, log_std, value

        def forward(self, obs: Tensor, deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
            dist, _, _, value = self.distribution(obs)
            actions = dist.get_actions(deterministic=deterministic)
            return actions, value.unsqueeze(-1), dist.log_prob(actions)

        def evaluate_actions(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            dist, _, _, value = self.distribution(obs)
            return value.unsqueeze(-1), dist.log_prob(actions), dist.entropy()

        def get_distribution(self, obs: Tensor):
            return self.distribution(obs)[0]

        def predict_values(self, obs: Tensor) -> Tensor:
            return self.model(obs.float())[2].unsqueeze(-1)

        def _predict(self, observation: Tensor, deterministic: bool = False) -> Tensor:
            return self.get_distribution(observation).get_actions(deterministic=deterministic)

    return _SB3GaussianPolicy

