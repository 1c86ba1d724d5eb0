"""Stochastic DDIM (eta > 0) sampler with per-denoising-step Gaussian log-probabilities (RL-100, DPPO).

Each of the K denoising steps is a Gaussian policy step of an inner MDP::

    x_{t_prev} ~ N(mu_theta(x_t, t, s), sigma_t^2 I)
    mu    = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps_hat     (DDIM, Song et al. eq. 12)
    sigma = max(eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)), min_std)

with ``x0_hat`` clipped to [-1, 1] and ``eps_hat`` the network's epsilon (as diffusers'
``DDIMScheduler.step``). The last step (``abar_prev = 1``) has sigma_t = 0 in DDIM; the floor
``min_std`` keeps every step stochastic, so every step has a finite log-probability for PPO ratios.
``log p`` of a step is ``-gaussian_nll`` from the loss core, summed over the chunk ``(Ta, Da)``.

A chain is ``(B, K + 1, Ta, Da)``: ``chain[:, 0]`` the initial noise, ``chain[:, k + 1]`` the sample
after step k; ``chain[:, -1]`` (clamped to [-1, 1]) is the normalised action chunk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers import DDIMScheduler
from embodied_distill.policies.diffusion.samplers import Sampler
from torch import Tensor

from embodied_distill.losses import ddim_sigma, ddim_step, gaussian_nll

if TYPE_CHECKING:
    from embodied_distill.policies.diffusion.modeling_diffusion import DiffusionPolicy


class StochasticDDIMSampler(Sampler):
    """``sampler=ddim_eta``: K = ``num_inference_steps`` stochastic DDIM steps with log-probabilities."""

    def __init__(self, policy: DiffusionPolicy):
        cfg = policy.config
        scheduler = DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps,
                                  beta_schedule=cfg.beta_schedule, clip_sample=cfg.clip_sample,
                                  prediction_type=cfg.prediction_type)
        scheduler.set_timesteps(cfg.num_inference_steps)
        self.timesteps = scheduler.timesteps.long()  # (K,) decreasing, e.g. 90, 80, ..., 0
        self.prev_timesteps = self.timesteps - cfg.num_train_timesteps // cfg.num_inference_steps
        super().__init__(policy)

    def step_distribution(self, x: Tensor, k: int, cond: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``(B, Ta, Da)`` and std (scalar tensor) of ``p(x_{t_prev} | x_t)`` at denoising step k."""
        abar = self.policy.alphas_cumprod
        timesteps = self.timesteps[k].expand(x.shape[0]).to(x.device)
        prev = self.prev_timesteps[k].expand(x.shape[0])
        x0, eps = self.policy.denoise(x, timesteps, cond)
        ddim_std = ddim_sigma(self.timesteps[k], self.prev_timesteps[k], abar, self.cfg.eta)  # scalar
        # the direction term keeps DDIM's own sigma (diffusers' formula); the floor only widens the noise
        mean = ddim_step(x0, eps, prev, abar, sigma=ddim_std.expand(x.shape[0]))
        return mean, ddim_std.clamp_min(self.cfg.min_std)

    @staticmethod
    def log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """``log N(sample; mean, std^2 I)`` summed over the chunk: ``(B, Ta, Da) -> (B,)``."""
        log_std = torch.log(std).expand_as(mean).flatten(1)
        return -gaussian_nll(sample.flatten(1), mean.flatten(1), log_std, reduction="none")

    @torch.no_grad()
    def sample_chain(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        """Run the chain from fresh noise: ``cond (B, Dg) -> (chain (B, K+1, Ta, Da), log_probs (B, K))``."""
        x = self.noise(*self.shape(cond), device=cond.device)
        chain, log_probs = [x], []
        for k in range(len(self.timesteps)):
            mean, std = self.step_distribution(x, k, cond)
            self.calls += 1
            x = mean + std * self.noise(*x.shape, device=cond.device)
            chain.append(x)
            log_probs.append(self.log_prob(x, mean, std))
        return torch.stack(chain, 1), torch.stack(log_probs, 1)

    def chain_log_probs(self, chain: Tensor, cond: Tensor) -> Tensor:
        """Log-probabilities of a recorded chain under the current weights (differentiable): ``(B, K)``."""
        out = []
        for k in range(len(self.timesteps)):
            mean, std = self.step_distribution(chain[:, k], k, cond)
            out.append(self.log_prob(chain[:, k + 1], mean, std))
        return torch.stack(out, 1)

    def __call__(self, cond: Tensor) -> Tensor:
        chain, _ = self.sample_chain(cond)
        return chain[:, -1].clamp(-1, 1)
