"""Diffusion Policy (Chi et al., 2023, https://arxiv.org/abs/2303.04137) with swappable fast samplers.

One checkpoint, five samplers chosen at evaluation time (``config.sampler``), see ``samplers.py``:
ddpm, ddim, streaming (SDP, https://arxiv.org/abs/2406.04806), rti (RTI-DP warm start,
https://arxiv.org/abs/2508.05396) and consistency (a 1/2-step head distilled from the DDIM teacher,
as RL-100 / Consistency Policy). Shapes: observations ``(B, To, Do)``, action chunks ``(B, Ta, Da)``.
"""

from __future__ import annotations

import copy

import torch
from diffusers import DDPMScheduler
from embodied_distill.policies.base import Policy
from embodied_distill.policies.diffusion.configuration_diffusion import DiffusionPolicyConfig
from embodied_distill.policies.diffusion.encoders import RgbEncoder
from embodied_distill.policies.diffusion.samplers import make_sampler
from embodied_distill.policies.diffusion.unet import ConditionalUnet1D
from torch import Tensor, nn

from embodied_distill.data.normalizer import Normalizer
from embodied_distill.losses import (
    add_noise,
    consistency_loss,
    consistency_output,
    ddim_step,
    denoising_loss,
    ema_update,
    predict_x0,
)

__all__ = ["DiffusionPolicy", "DiffusionPolicyConfig"]


class DiffusionPolicy(Policy):
    name = "diffusion"
    default_ema_decay = 0.999  # weight EMA for training (distill.ema_decay: null); as Diffusion Policy

    def __init__(self, config: DiffusionPolicyConfig, normalizer: Normalizer):
        super().__init__(config, normalizer)
        if config.obs_dim < 1 or config.action_dim < 1:
            raise ValueError("obs_dim and action_dim must be set (>= 1) before building the policy")
        cond_dim = config.obs_horizon * config.obs_dim
        self.rgb_encoder = None
        if config.obs_encoder == "rgb":
            self.rgb_encoder = RgbEncoder(config.image_size, config.crop_size)
            cond_dim += config.obs_horizon * self.rgb_encoder.out_dim
        unet_kwargs = dict(action_dim=config.action_dim, global_cond_dim=cond_dim,
                           step_embed_dim=config.step_embed_dim, down_dims=config.down_dims,
                           kernel_size=config.kernel_size, n_groups=config.n_groups)
        self.unet = ConditionalUnet1D(**unet_kwargs)
        # the 1-step head; trained by consistency distillation (``consistency_loss``) after the main net
        self.consistency_unet = ConditionalUnet1D(**unet_kwargs)
        self.register_buffer("consistency_trained", torch.zeros((), dtype=torch.bool))
        self.scheduler = DDPMScheduler(num_train_timesteps=config.num_train_timesteps,
                                       beta_schedule=config.beta_schedule, clip_sample=config.clip_sample,
                                       prediction_type=config.prediction_type)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone().float(),
                             persistent=False)
        self._ema: list[nn.Module] = []  # EMA target of the consistency head (a list: not a submodule)
        self.sampler = make_sampler(self)

    # ------------------------------------------------------------------ conditioning
    def global_cond(self, obs: Tensor, images: Tensor | None = None) -> Tensor:
        """Normalised obs (B, To, Do) [+ images (B, To, 3, H, W) uint8/float] -> (B, Dg)."""
        feats = [obs.flatten(1)]
        if self.rgb_encoder is not None:
            if images is None:
                raise ValueError("obs_encoder='rgb' needs an 'rgb' observation (B, To, 3, H, W)")
            B, To = images.shape[:2]
            feats.append(self.rgb_encoder(images.flatten(0, 1)).view(B, To * self.rgb_encoder.out_dim))
        return torch.cat(feats, dim=-1)

    def _cond_from_batch(self, batch: dict[str, Tensor]) -> Tensor:
        return self.global_cond(self.stack_obs(batch), batch.get("rgb"))

    def denoise(self, x: Tensor, timesteps: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """One teacher network call at noisy actions x (B, Ta, Da), timesteps (B,) or (B, Ta) -> (x0, eps)."""
        out = self.unet(x, timesteps, cond)
        x0, eps = predict_x0(out, x, timesteps, self.alphas_cumprod, self.config.prediction_type)
        if self.config.clip_sample:
            x0 = x0.clamp(-1, 1)
        return x0, eps

    def consistency_fn(self, x: Tensor, timesteps: Tensor, cond: Tensor,
                       net: nn.Module | None = None) -> Tensor:
        """The consistency function ``f(x_t, t) = c_skip(t) x_t + c_out(t) F(x_t, t)`` (B, Ta, Da).

        The head ``F`` predicts x0 directly (an epsilon head would divide by ``sqrt(abar_t)``, ~0 at the
        top timestep); ``f(x, 0) = x`` by the boundary scalings. Unclamped, so its gradient is exact.
        """
        out = (net or self.consistency_unet)(x, timesteps, cond)
        return consistency_output(x, out, timesteps)

    # ------------------------------------------------------------------ inference
    def _predict_normalized_chunk(self, obs: Tensor, images: Tensor | None = None) -> Tensor:
        return self.sampler(self.global_cond(obs, images))

    @torch.no_grad()
    def predict_action_chunk(self, obs: dict[str, Tensor]) -> Tensor:
        chunk = self._predict_normalized_chunk(self.stack_obs(obs), obs.get("rgb"))
        return self.normalizer.unnormalize("action", chunk)

    @property
    def stateful_select_action(self) -> bool:
        """True when the sampler carries state from one chunk to the next (streaming buffer, RTI guess):
        the robot bridge then lets ``select_action`` own the chunk schedule."""
        return self.config.sampler in ("streaming", "rti")

    def reset(self) -> None:
        super().reset()
        self.sampler.reset()

    def set_sampler(self, name: str, **overrides) -> None:
        """Switch sampler (and e.g. ``num_inference_steps``) on a trained policy; resets its state."""
        values = {**{f: getattr(self.config, f) for f in self.config.__dataclass_fields__},
                  "sampler": name, **overrides}
        self.config = type(self.config)(**values)
        if name == "consistency" and not bool(self.consistency_trained):
            raise ValueError("this checkpoint has no trained consistency head (train with "
                             "distill.consistency_steps > 0)")
        self.sampler = make_sampler(self)
        self.reset()

    # ------------------------------------------------------------------ training
    def sample_timesteps(self, batch_size: int, horizon: int, device: torch.device) -> Tensor:
        """(B, Ta) training timesteps: one level per sample, or SDP's chunk-wise staircase.

        Chunk-wise regime (probability ``streaming_training_prob``): chunk i of the buffer sits at level
        ``floor(L (i+1) / h) - 1 - j`` with ``j ~ U[0, L/h)`` shared by the sample, mapped to training
        timesteps by ``level_to_timestep``.
        """
        cfg = self.config
        t = torch.randint(0, cfg.num_train_timesteps, (batch_size, 1), device=device)
        t = t.expand(batch_size, horizon)
        if cfg.streaming_training_prob > 0:
            levels = staircase_levels(cfg.n_levels, cfg.n_chunks, cfg.n_action_steps, horizon, device)
            j = torch.randint(0, cfg.n_levels // cfg.n_chunks, (batch_size, 1), device=device)
            stair = level_to_timestep(levels[None, :] - j, cfg.n_levels, cfg.num_train_timesteps,
                                      cfg.streaming_level_power)
            use = torch.rand(batch_size, 1, device=device) < cfg.streaming_training_prob
            t = torch.where(use, stair, t)
        return t.contiguous()

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """batch: obs keys (B, To, Dk), "action" (B, Ta, Da), "action_is_pad" (B, Ta)."""
        cond = self._cond_from_batch(batch)
        x0 = self.normalizer.normalize("action", batch["action"].to(cond.device))
        noise = torch.randn_like(x0)
        t = self.sample_timesteps(x0.shape[0], x0.shape[1], x0.device)
        xt = add_noise(x0, noise, t, self.alphas_cumprod)
        out = self.unet(xt, t, cond)
        mask = ~batch["action_is_pad"].to(cond.device)
        loss = denoising_loss(out, noise, x0, t, self.alphas_cumprod, self.config.prediction_type, mask)
        return loss, {"loss": float(loss.detach())}

    def consistency_loss(self, batch: dict[str, Tensor], grid_steps: int = 10, ema_decay: float = 0.95
                         ) -> tuple[Tensor, dict[str, float]]:
        """LCM-style consistency distillation of ``consistency_unet`` from the frozen DDIM teacher.

        A grid of ``grid_steps`` timesteps ``t_n = (n+1) N / grid - 1``; the teacher takes one
        deterministic DDIM step from ``x_{t_n}`` to ``x_{t_{n-1}}``; the target is the EMA head's
        consistency function there (``f(x, t) = c_skip x + c_out x0_pred``; at n = 0 the teacher's clean
        estimate itself). Call ``update_consistency_ema`` after each optimizer step.
        """
        if not self._ema:
            self._ema.append(copy.deepcopy(self.consistency_unet).requires_grad_(False))
        with torch.no_grad():
            cond = self._cond_from_batch(batch)
            x0 = self.normalizer.normalize("action", batch["action"].to(cond.device))
            B, N = x0.shape[0], self.config.num_train_timesteps
            grid = torch.round(torch.arange(1, grid_steps + 1, device=x0.device) * N / grid_steps).long() - 1
            n = torch.randint(0, grid_steps, (B,), device=x0.device)
            t, t_prev = grid[n], torch.where(n > 0, grid[(n - 1).clamp_min(0)], torch.full_like(n, -1))
            xt = add_noise(x0, torch.randn_like(x0), t, self.alphas_cumprod)
            x0_teacher, eps_teacher = self.denoise(xt, t, cond)
            x_prev = ddim_step(x0_teacher, eps_teacher, t_prev, self.alphas_cumprod)
            target = self.consistency_fn(x_prev, t_prev.clamp_min(0), cond, net=self._ema[0])
            target = torch.where((n == 0)[:, None, None], x0_teacher, target)
        student = self.consistency_fn(xt, t, cond)
        mask = ~batch["action_is_pad"].to(cond.device)
        loss = consistency_loss(student, target, mask)
        return loss, {"consistency_loss": float(loss.detach())}

    def init_consistency_from_teacher(self) -> None:
        """Start the head (an x0 predictor) from the denoiser when that predicts x0 too; an epsilon
        denoiser's weights would start it at the wrong target, so it keeps its fresh initialisation."""
        if self.config.prediction_type == "sample":
            self.consistency_unet.load_state_dict(self.unet.state_dict())
        self._ema[:] = [copy.deepcopy(self.consistency_unet).requires_grad_(False)]

    def update_consistency_ema(self, decay: float = 0.95) -> None:
        ema_update(self._ema[0].parameters(), self.consistency_unet.parameters(), decay)
        self.consistency_trained.fill_(True)


def staircase_levels(n_levels: int, n_chunks: int, chunk: int, horizon: int, device=None) -> Tensor:
    """(horizon,) steady-state noise level of each buffer position: chunk i at floor(L (i+1) / h) - 1.
    Positions past ``n_chunks * chunk`` (when Ta does not divide the horizon) share the last chunk's level."""
    i = (torch.arange(horizon, device=device) // chunk).clamp_max(n_chunks - 1)
    return torch.div(n_levels * (i + 1), n_chunks, rounding_mode="floor") - 1


def level_to_timestep(levels: Tensor, n_levels: int, num_train_timesteps: int, power: float = 1.0) -> Tensor:
    """Buffer level l in [0, L) -> training timestep ``round(N ((l+1) / L) ** power) - 1``; level -1 (clean)
    -> -1. ``power`` = 1 spaces the levels evenly (SDP); < 1 moves the low levels to higher noise, so the
    last call before a chunk is popped still has room to follow the newest observation."""
    frac = ((levels + 1).clamp_min(0).double() / n_levels) ** power
    t = torch.round(frac * num_train_timesteps).long() - 1
    return torch.where(levels < 0, torch.full_like(t, -1), t)
