"""Samplers of the diffusion policy; each keeps its own state across control steps and resets per episode.

Every sampler maps the observation conditioning (B, Dg) to a normalised action chunk (B, Ta, Da) and
counts its network calls (``calls``), so benchmarks can report calls per executed action.

- ``ddpm`` / ``ddim``: full denoising of fresh noise with diffusers' DDPMScheduler / DDIMScheduler.
- ``streaming`` (SDP): a rolling buffer whose noise level rises along the horizon; each call lowers
  every position by one level; when the first chunk is clean it is returned, the buffer shifts by one
  chunk and fresh noise enters at the top level. Diffusers schedulers step one timestep for a whole
  sample, so the per-position DDIM update uses the core's ``ddim_step`` on the scheduler's
  ``alphas_cumprod``.
- ``rti`` (RTI-DP): the first chunk is fully denoised (DDIM); afterwards the previous chunk shifted by
  the executed actions (last action repeated) is noised to ``rti_steps[0]`` and denoised through the
  remaining entries (levels: 0 = clean, k > 0 = training timestep k - 1).
- ``consistency``: the distilled head maps noise at the top timestep to actions in 1 (or 2) calls.
- ``ddim_eta``: stochastic DDIM with per-step Gaussian log-probabilities (``stochastic.py``, RL-100).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor

from embodied_distill.losses import add_noise, ddim_sigma, ddim_step

if TYPE_CHECKING:
    from embodied_distill.policies.diffusion.modeling_diffusion import DiffusionPolicy


class Sampler:
    def __init__(self, policy: DiffusionPolicy):
        self.policy = policy
        self.cfg = policy.config
        self.calls = 0
        self.generator: torch.Generator | None = None
        self.reset()

    def reset(self) -> None:
        if self.cfg.seed is not None:
            self.generator = torch.Generator().manual_seed(int(self.cfg.seed))

    def noise(self, *shape: int, device: torch.device) -> Tensor:
        return torch.randn(*shape, generator=self.generator).to(device)

    def shape(self, cond: Tensor) -> tuple[int, int, int]:
        return cond.shape[0], self.cfg.action_horizon, self.cfg.action_dim

    def __call__(self, cond: Tensor) -> Tensor:
        raise NotImplementedError


class SchedulerSampler(Sampler):
    """Full denoising with a diffusers scheduler (DDPM or deterministic DDIM)."""

    def __init__(self, policy: DiffusionPolicy, kind: str):
        cfg = policy.config
        cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
        self.scheduler = cls(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                             clip_sample=cfg.clip_sample, prediction_type=cfg.prediction_type)
        self.scheduler.set_timesteps(cfg.num_inference_steps)
        super().__init__(policy)

    def denoise_from(self, x: Tensor, cond: Tensor, timesteps) -> Tensor:
        for t in timesteps:
            out = self.policy.unet(x, t.to(x.device).expand(x.shape[0]), cond)
            self.calls += 1
            x = self.scheduler.step(out, t, x, generator=self.generator).prev_sample
        return x

    def __call__(self, cond: Tensor) -> Tensor:
        x = self.noise(*self.shape(cond), device=cond.device)
        return self.denoise_from(x, cond, self.scheduler.timesteps)


class StreamingSampler(Sampler):
    """SDP's variable-noise action buffer (see module docstring)."""

    def __init__(self, policy: DiffusionPolicy):
        from embodied_distill.policies.diffusion.modeling_diffusion import staircase_levels

        cfg = policy.config
        if cfg.action_horizon % cfg.n_action_steps:
            raise ValueError("sampler=streaming needs n_action_steps to divide action_horizon")
        if cfg.n_levels % cfg.n_chunks:
            raise ValueError(f"streaming_levels={cfg.n_levels} must be a multiple of the chunk count "
                             f"h={cfg.n_chunks}")
        self.stair = staircase_levels(cfg.n_levels, cfg.n_chunks, cfg.n_action_steps, cfg.action_horizon)
        self.calls_per_chunk = cfg.n_levels // cfg.n_chunks
        self.buffer: Tensor | None = None
        self.levels: Tensor | None = None
        super().__init__(policy)

    def reset(self) -> None:
        super().reset()
        self.buffer, self.levels = None, None

    def _step(self, cond: Tensor, lower: Tensor) -> None:
        """One network call; positions where ``lower`` (Ta,) is true go down one level."""
        from embodied_distill.policies.diffusion.modeling_diffusion import level_to_timestep

        cfg = self.cfg
        B = self.buffer.shape[0]
        t = level_to_timestep(self.levels, cfg.n_levels, cfg.num_train_timesteps,
                              cfg.streaming_level_power).to(cond.device)
        t_net = t.clamp_min(0)[None].expand(B, -1)
        x0, eps = self.policy.denoise(self.buffer, t_net, cond)
        self.calls += 1
        new_levels = torch.where(lower, self.levels - 1, self.levels)
        t_prev = level_to_timestep(new_levels, cfg.n_levels, cfg.num_train_timesteps,
                                   cfg.streaming_level_power).to(cond.device)
        abar = self.policy.alphas_cumprod
        sigma = None  # DDIM with eta > 0: part of the direction term becomes fresh noise (per position)
        if cfg.streaming_eta > 0:
            sigma = ddim_sigma(t, t_prev, abar, cfg.streaming_eta).to(cond.device)
        stepped = ddim_step(x0, eps, t_prev[None].expand(B, -1), abar, sigma=sigma)
        if sigma is not None:
            stepped = stepped + sigma[None, :, None] * self.noise(*x0.shape, device=cond.device)
        self.buffer = torch.where(lower.to(cond.device)[None, :, None], stepped, self.buffer)
        self.levels = new_levels

    def __call__(self, cond: Tensor) -> Tensor:
        cfg = self.cfg
        B, T, D = self.shape(cond)
        if self.buffer is None or self.buffer.shape[0] != B:
            # episode start: pure noise at the top level, denoised position-wise down to the staircase
            self.buffer = self.noise(B, T, D, device=cond.device)
            self.levels = torch.full((T,), cfg.n_levels - 1, dtype=torch.long)
            while bool((self.levels > self.stair).any()):
                self._step(cond, self.levels > self.stair)
        for _ in range(self.calls_per_chunk):  # every position down one level per call
            self._step(cond, torch.ones(T, dtype=torch.bool))
        Ta = cfg.n_action_steps
        clean = self.buffer[:, :Ta]
        # shift one chunk and append fresh noise at the top level
        self.buffer = torch.cat([self.buffer[:, Ta:], self.noise(B, Ta, D, device=cond.device)], dim=1)
        self.levels = self.stair.clone()
        chunk = torch.cat([clean, clean[:, -1:].expand(B, T - Ta, D)], dim=1)
        return chunk


class RTISampler(Sampler):
    """RTI warm start from the previous chunk (see module docstring)."""

    def __init__(self, policy: DiffusionPolicy):
        self.full = SchedulerSampler(policy, "ddim")
        self.prev: Tensor | None = None
        super().__init__(policy)

    def reset(self) -> None:
        super().reset()
        self.full.generator = self.generator
        self.prev = None

    def shifted_guess(self) -> Tensor:
        """Previous chunk shifted by the executed actions, last action repeated: (B, Ta, Da)."""
        k = self.cfg.n_action_steps
        guess = torch.cat([self.prev[:, k:], self.prev[:, -1:].expand(-1, k, -1)], dim=1)
        if self.cfg.rti_gripper == "clip":
            dims = list(self.cfg.gripper_dims)
            guess[..., dims] = torch.where(guess[..., dims] >= 0, 1.0, -1.0)
        return guess

    def __call__(self, cond: Tensor) -> Tensor:
        if self.prev is None or self.prev.shape[0] != cond.shape[0]:
            before = self.full.calls
            self.prev = self.full(cond)
            self.calls += self.full.calls - before
            return self.prev
        x = self.shifted_guess()
        steps = self.cfg.rti_steps
        if steps[0] > 0:
            t0 = torch.full((x.shape[0],), steps[0] - 1, dtype=torch.long, device=cond.device)
            x = add_noise(x, self.noise(*x.shape, device=cond.device), t0, self.policy.alphas_cumprod)
        for level, next_level in zip(steps[:-1], steps[1:]):
            t = torch.full((x.shape[0],), level - 1, dtype=torch.long, device=cond.device)
            x0, eps = self.policy.denoise(x, t, cond)
            self.calls += 1
            x = ddim_step(x0, eps, torch.full_like(t, next_level - 1), self.policy.alphas_cumprod)
        self.prev = x
        return x


class ConsistencySampler(Sampler):
    """1- or 2-step generation with the distilled consistency head."""

    def __call__(self, cond: Tensor) -> Tensor:
        B, T, D = self.shape(cond)
        N = self.cfg.num_train_timesteps
        x = self.noise(B, T, D, device=cond.device)
        times = [N - 1] if self.cfg.consistency_steps == 1 else [N - 1, N // 2 - 1]
        out = x
        for i, time in enumerate(times):
            t = torch.full((B,), time, dtype=torch.long, device=cond.device)
            if i > 0:  # re-noise the current estimate to the intermediate time
                x = add_noise(out, self.noise(B, T, D, device=cond.device), t, self.policy.alphas_cumprod)
            out = self.policy.consistency_fn(x, t, cond).clamp(-1, 1)
            self.calls += 1
        return out


def make_sampler(policy: DiffusionPolicy) -> Sampler:
    name = policy.config.sampler
    if name in ("ddpm", "ddim"):
        return SchedulerSampler(policy, name)
    if name == "streaming":
        return StreamingSampler(policy)
    if name == "rti":
        return RTISampler(policy)
    if name == "ddim_eta":
        from embodied_distill.policies.diffusion.stochastic import StochasticDDIMSampler

        return StochasticDDIMSampler(policy)
    return ConsistencySampler(policy)
