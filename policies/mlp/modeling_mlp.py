"""MLP behaviour cloning with action chunking: (B, To, Do) -> (B, Ta, Da).

A deterministic regression baseline (the "first policy" of the walking skeleton); diffusion policies
live in ``policies/diffusion``.
"""

from __future__ import annotations

import torch
from embodied_distill.policies.base import Policy
from embodied_distill.policies.mlp.configuration_mlp import MLPPolicyConfig
from torch import Tensor, nn

from embodied_distill.data.normalizer import Normalizer
from embodied_distill.losses import masked_l1, masked_mse

__all__ = ["MLPPolicy", "MLPPolicyConfig"]


class MLPPolicy(Policy):
    name = "mlp"

    def __init__(self, config: MLPPolicyConfig, normalizer: Normalizer):
        super().__init__(config, normalizer)
        if config.obs_dim < 1 or config.action_dim < 1:
            raise ValueError("obs_dim and action_dim must be set (>= 1) before building the policy")
        layers: list[nn.Module] = []
        width = config.obs_horizon * config.obs_dim
        for h in config.hidden_dims:
            layers += [nn.Linear(width, h), nn.LayerNorm(h), nn.Mish()]
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            width = h
        layers.append(nn.Linear(width, config.action_horizon * config.action_dim))
        self.net = nn.Sequential(*layers)

    def _predict_normalized_chunk(self, obs: Tensor) -> Tensor:
        """(B, To, Do) -> (B, Ta, Da), both normalised."""
        out = self.net(obs.flatten(1))
        return out.view(obs.shape[0], self.config.action_horizon, self.config.action_dim)

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """batch: obs keys (B, To, Dk), "action" (B, Ta, Da), "action_is_pad" (B, Ta)."""
        obs = self.stack_obs(batch)
        if self.training and self.config.obs_noise_std > 0:
            obs = obs + self.config.obs_noise_std * torch.randn_like(obs)
        target = self.normalizer.normalize("action", batch["action"].to(obs.device))
        pred = self._predict_normalized_chunk(obs)
        mask = ~batch["action_is_pad"].to(obs.device)
        loss_fn = masked_mse if self.config.loss == "mse" else masked_l1
        loss = loss_fn(pred, target, mask)
        return loss, {"loss": float(loss.detach())}
