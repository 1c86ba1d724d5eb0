"""Embodiment-agnostic Gaussian policy for COMPASS (NVlabs/COMPASS): padded, masked state and action
dims plus an embodiment code.

Shapes (``E`` embodiments, ``Do = max_obs_dim``, ``Da = max_action_dim``)::

    pad_features(x (B, D_e), Do) -> (B, Do)            zeros after the embodiment's own D_e features
    feature_mask(dims (B,), Da) -> (B, Da) bool        True on each row's first dims[i] features
    CompassPolicy.distribution(state (B, Do), emb (B,)) -> mean (B, Da) (0 on masked dims), log_std (Da,)
        (or (B, Da): one row per embodiment with ``std_per_embodiment``)

States and actions are normalised per embodiment (normaliser keys ``state/<name>``, ``action/<name>``)
before padding, so the shared network sees comparable scales. One instance acts as
``config.embodiment`` through the Policy contract (``predict_action_chunk({"state": (B, 1, Ds_e)}) ->
(B, 1, Da_e)`` in that robot's units); :meth:`CompassPolicy.as_embodiment` gives the same weights acting
as another robot. The same class is the IL base (trained by BC on pooled demos) and the generalist
(distilled from the residual-RL specialists).
"""

from __future__ import annotations

import dataclasses

import torch
from embodied_distill.policies.base import Policy
from embodied_distill.policies.compass.configuration_compass import CompassPolicyConfig
from torch import Tensor, nn

from embodied_distill.data.normalizer import Normalizer
from embodied_distill.losses import masked_mse

__all__ = ["CompassPolicy", "CompassPolicyConfig", "feature_mask", "pad_features"]


def pad_features(x: Tensor, width: int) -> Tensor:
    """(..., D) -> (..., width): zeros appended after the D real features (D <= width)."""
    d = x.shape[-1]
    if d > width:
        raise ValueError(f"cannot pad {d} features into a width of {width}")
    if d == width:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:-1], width - d)], dim=-1)


def feature_mask(dims: Tensor, width: int) -> Tensor:
    """(B,) per-row feature counts -> (B, width) bool mask, True on the first ``dims[i]`` features."""
    dims = torch.as_tensor(dims)
    if dims.numel() and (int(dims.max()) > width or int(dims.min()) < 1):
        raise ValueError(f"feature counts must be in [1, {width}], got {dims.tolist()}")
    return torch.arange(width, device=dims.device) < dims.reshape(-1, 1)


class CompassPolicy(Policy):
    """MLP on ``[padded normalised state, embodiment code]`` -> diagonal Gaussian over padded actions."""

    name = "compass"

    def __init__(self, config: CompassPolicyConfig, normalizer: Normalizer):
        super().__init__(config, normalizer)
        c = config
        for e in c.names:
            for key in (f"state/{e}", f"action/{e}"):
                if key not in normalizer:
                    raise ValueError(f"the normaliser has no statistics for {key!r}")
        if c.embedding == "learned":
            self.embed = nn.Embedding(c.max_embodiments, c.embedding_dim)
            code = c.embedding_dim
        else:
            self.embed = None
            code = c.max_embodiments
        layers: list[nn.Module] = []
        width = c.max_obs_dim + code
        for h in c.hidden_dims:
            layers += [nn.Linear(width, h), nn.LayerNorm(h), nn.Mish()]
            width = h
        layers.append(nn.Linear(width, c.max_action_dim))
        self.net = nn.Sequential(*layers)
        rows = (c.max_embodiments,) if c.std_per_embodiment else ()
        self.log_std = nn.Parameter(torch.full((*rows, c.max_action_dim), float(c.log_std_init)))
        # from the config, not saved: the weights stay loadable after a robot is added to the list
        self.register_buffer("obs_dims", torch.tensor([int(e["obs_dim"]) for e in c.embodiments]),
                             persistent=False)
        self.register_buffer("action_dims", torch.tensor([int(e["action_dim"]) for e in c.embodiments]),
                             persistent=False)

    # ------------------------------------------------------------------ embodiment interface
    def code(self, emb: Tensor) -> Tensor:
        """(B,) embodiment indices -> (B, max_embodiments) one-hot or (B, embedding_dim) embedding."""
        emb = emb.to(self.device, torch.long)
        if self.embed is not None:
            return self.embed(emb)
        return nn.functional.one_hot(emb, self.config.max_embodiments).float()

    def action_mask(self, emb: Tensor) -> Tensor:
        """(B,) embodiment indices -> (B, max_action_dim) bool: the dims each row's robot has."""
        return feature_mask(self.action_dims[emb.to(self.device, torch.long)], self.config.max_action_dim)

    def normalize_state(self, name: str, state: Tensor) -> Tensor:
        """Embodiment ``name``'s states (..., Ds_e) in env units -> (..., max_obs_dim) normalised, padded."""
        state = self.normalizer.normalize(f"state/{name}", state.float())
        return pad_features(state, self.config.max_obs_dim)

    def action_offset(self, name: str, state: Tensor | None) -> Tensor | float:
        """What the network's action is relative to: the first ``Da_e`` state features (the joint
        positions) for an embodiment with ``action_relative_to_state`` (absolute joint-position control),
        else 0. ``state`` (..., Ds_e) in env units."""
        spec = self.config.spec(name)
        if not spec.get("action_relative_to_state", False):
            return 0.0
        if state is None:
            raise ValueError(f"{name} predicts actions relative to its state: pass the state")
        return state[..., : int(spec["action_dim"])].float()

    def normalize_action(self, name: str, action: Tensor, state: Tensor | None = None) -> Tensor:
        """(..., Da_e) env units (and the state (..., Ds_e) they were taken in) -> (..., max_action_dim)
        normalised, padded with zeros."""
        rel = action.float() - self.action_offset(name, state)
        return pad_features(self.normalizer.normalize(f"action/{name}", rel), self.config.max_action_dim)

    def unnormalize_action(self, name: str, action: Tensor, state: Tensor | None = None) -> Tensor:
        """(..., max_action_dim) normalised (and the state (..., Ds_e)) -> (..., Da_e) in ``name``'s units."""
        da = int(self.config.spec(name)["action_dim"])
        offset = self.action_offset(name, state)
        return self.normalizer.unnormalize(f"action/{name}", action[..., :da]) + offset

    def distribution(self, state: Tensor, emb: Tensor) -> tuple[Tensor, Tensor]:
        """Padded normalised states (B, Do) and indices (B,) -> (mean (B, Da), log_std (Da,), or (B, Da)
        with ``std_per_embodiment``), normalised action units; the mean is exactly 0 on each row's masked
        (absent) dims."""
        if state.shape[-1] != self.config.max_obs_dim:
            raise ValueError(f"expected padded states of width {self.config.max_obs_dim}, "
                             f"got {state.shape[-1]}")
        obs_mask = feature_mask(self.obs_dims[emb.to(self.device, torch.long)], self.config.max_obs_dim)
        x = torch.cat([state.to(self.device) * obs_mask, self.code(emb)], dim=-1)
        log_std = self.log_std
        if self.config.std_per_embodiment:
            log_std = log_std[emb.to(self.device, torch.long)]
        return self.net(x) * self.action_mask(emb), log_std

    # ------------------------------------------------------------------ Policy contract
    def _emb(self, batch: int) -> Tensor:
        return torch.full((batch,), self.config.index(self.config.embodiment), device=self.device)

    def stack_obs(self, obs: dict[str, Tensor]) -> Tensor:
        """``{"state": (B, To, Ds_e)}`` -> (B, To, max_obs_dim) normalised, padded (this embodiment)."""
        state = obs["state"].to(self.device, torch.float32)
        if state.shape[-1] != self.config.obs_dim:
            raise ValueError(f"{self.config.embodiment} states have {self.config.obs_dim} features, "
                             f"got {state.shape[-1]}")
        return self.normalize_state(self.config.embodiment, state)

    def _predict_normalized_chunk(self, obs: Tensor) -> Tensor:
        """(B, 1, max_obs_dim) -> (B, 1, max_action_dim) deterministic (mean) actions, normalised."""
        return self.distribution(obs[:, -1], self._emb(obs.shape[0]))[0].unsqueeze(1)

    @torch.no_grad()
    def predict_action_chunk(self, obs: dict[str, Tensor]) -> Tensor:
        """``{"state": (B, 1, Ds_e)}`` -> (B, 1, Da_e) mean actions in this embodiment's units."""
        chunk = self._predict_normalized_chunk(self.stack_obs(obs))
        return self.unnormalize_action(self.config.embodiment, chunk, obs["state"][:, -1:].to(chunk.device))

    @torch.no_grad()
    def action_distribution(self, obs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``{"state": (B, 1, Ds_e)}`` -> Gaussian (mean (B, Da_e), std (B, Da_e)) in env units."""
        mean, log_std = self.distribution(self.stack_obs(obs)[:, -1], self._emb(obs["state"].shape[0]))
        name, da = self.config.embodiment, self.config.action_dim
        scale = self.normalizer.params[f"action/{name}"]["scale"].to(mean)
        state = obs["state"][:, -1].to(mean.device)
        std = (log_std[..., :da].exp() / scale).expand(mean.shape[0], da)
        return self.unnormalize_action(name, mean, state), std

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Behaviour cloning on a mixed-embodiment batch (already normalised and padded):
        ``state`` (B, Do), ``embodiment`` (B,), ``action`` (B, Da) -> masked MSE over each row's dims."""
        emb = batch["embodiment"].to(self.device)
        mean, _ = self.distribution(batch["state"].to(self.device), emb)
        loss = masked_mse(mean, batch["action"].to(self.device), self.action_mask(emb))
        return loss, {"loss": float(loss.detach())}

    def as_embodiment(self, name: str) -> CompassPolicy:
        """A copy with the same weights and normaliser that acts as embodiment ``name``."""
        other = CompassPolicy(dataclasses.replace(self.config, embodiment=name), self.normalizer)
        other.load_state_dict(self.state_dict())
        return other.to(self.device).train(self.training)
