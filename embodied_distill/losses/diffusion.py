"""Diffusion-policy training losses and consistency-distillation pieces (DDPM / DDIM conventions).

Noising follows DDPM with ``alpha_bar_t = alphas_cumprod[t]`` (the scheduler's ``alphas_cumprod``,
e.g. ``diffusers.DDPMScheduler(...).alphas_cumprod``)::

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps

and the network predicts, depending on ``prediction_type``: ``"epsilon"`` (eps), ``"sample"`` (x_0) or
``"v_prediction"`` (``v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0``).

Consistency distillation (LCM style, as RL-100's consistency head): the student at timestep t outputs
``f(x_t, t) = c_skip(t) x_t + c_out(t) x0_pred(x_t, t)`` with the boundary scalings of
:func:`consistency_scalings` (``f(x, 0) = x``); the target is the EMA student's ``f`` at the point
reached by one deterministic (DDIM, eta = 0) teacher step from ``x_t`` to ``x_{t-k}``
(:func:`ddim_step`). A stochastic DDPM teacher step breaks consistency distillation.

Shapes: samples ``(B, ...)`` -- an action chunk ``(B, Ta, Da)`` -- timesteps ``(B,)`` int64 (or
``(B, Ta)``: one diffusion step per action position, as SDP's variable-noise buffer), masks over
leading dimensions (``(B, Ta)`` or the full shape), as in :mod:`~embodied_distill.losses.continuous`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .reduce import Reduction, check_reduction, masked_reduce

_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in _PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}")


def _per_sample(coef: Tensor, like: Tensor) -> Tensor:
    """``coef`` ``(B,)`` -- or ``(B, T)`` for per-position timesteps (streaming diffusion) -- reshaped
    to broadcast against ``like`` ``(B, ...)`` / ``(B, T, ...)``, in ``like``'s dtype."""
    return coef.to(like.dtype).reshape(coef.shape + (1,) * (like.dim() - coef.dim()))


def _alpha_bars(alphas_cumprod: Tensor, timesteps: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """``sqrt(alpha_bar_t)`` and ``sqrt(1 - alpha_bar_t)`` broadcastable against ``like``."""
    abar = alphas_cumprod.to(like.device)[timesteps.long().to(like.device)]
    return _per_sample(abar.sqrt(), like), _per_sample((1.0 - abar).sqrt(), like)


def add_noise(sample: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward process ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``; ``(B, ...)`` with ``(B,)`` t."""
    a, s = _alpha_bars(alphas_cumprod, timesteps, sample)
    return a * sample + s * noise


def diffusion_target(
    sample: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, prediction_type: str
) -> Tensor:
    """The regression target: eps, x_0, or ``v = sqrt(abar) eps - sqrt(1 - abar) x_0``."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return sample
    a, s = _alpha_bars(alphas_cumprod, timesteps, sample)
    return a * noise - s * sample


def denoising_loss(
    model_output: Tensor,
    noise: Tensor,
    sample: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    prediction_type: str = "epsilon",
    mask: Tensor | None = None,
    *,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Diffusion Policy's training loss: MSE between ``model_output`` and the ``prediction_type`` target.

    Args:
        model_output: the network's prediction at ``x_t = add_noise(sample, noise, timesteps)``,
            ``(B, ...)``.
        noise: the eps used to noise ``sample``; ``sample``: the clean x_0 ``(B, ...)``.
        timesteps: ``(B,)`` int; ``alphas_cumprod``: ``(num_train_timesteps,)``.
        mask: e.g. ``(B, Ta)`` to ignore padded action steps, or ``(B, Ta, Da)``.
    """
    check_reduction(reduction)
    target = diffusion_target(sample, noise, timesteps, alphas_cumprod, prediction_type).detach()
    if model_output.shape != target.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} must match sample {tuple(target.shape)}")
    return masked_reduce((model_output - target).square(), mask, reduction, num_items)


def predict_x0(
    model_output: Tensor, sample_t: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """Convert a network output at ``x_t`` into ``(x0_pred, eps_pred)`` (both ``(B, ...)``)."""
    _check_prediction_type(prediction_type)
    a, s = _alpha_bars(alphas_cumprod, timesteps, sample_t)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample_t - s * eps) / a
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample_t - a * x0) / s
    else:
        x0 = a * sample_t - s * model_output
        eps = a * model_output + s * sample_t
    return x0, eps


def _prev_alpha_bar(alphas_cumprod: Tensor, prev_timesteps: Tensor, device: torch.device) -> Tensor:
    """``abar`` at ``prev_timesteps``; a negative entry ("past the last step") gives ``abar = 1``, like
    diffusers' ``final_alpha_cumprod`` with ``set_alpha_to_one``."""
    prev = prev_timesteps.long().to(device)
    abar = alphas_cumprod.to(device)[prev.clamp_min(0)]
    return torch.where(prev >= 0, abar, torch.ones_like(abar))


def ddim_sigma(timesteps: Tensor, prev_timesteps: Tensor, alphas_cumprod: Tensor, eta: float = 1.0) -> Tensor:
    """DDIM's noise std of the step ``t -> t_prev`` (Song et al. 2021, eq. 16), shaped like ``timesteps``::

        sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))

    ``eta = 1`` is the DDPM posterior std, ``eta = 0`` deterministic DDIM; a negative ``prev`` means
    ``abar_prev = 1`` (sigma 0); ``timesteps`` are clamped at 0 (the step the network is evaluated at).
    """
    device = alphas_cumprod.device
    a_t = alphas_cumprod[timesteps.long().to(device).clamp_min(0)]
    a_prev = _prev_alpha_bar(alphas_cumprod, prev_timesteps, device)
    return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp_min(0).sqrt()


def ddim_step(x0_pred: Tensor, eps_pred: Tensor, prev_timesteps: Tensor, alphas_cumprod: Tensor,
              sigma: Tensor | None = None) -> Tensor:
    """DDIM step to ``prev_timesteps``, without its noise term::

        x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps     (+ sigma z, added by the caller)

    ``sigma`` (``ddim_sigma``, shaped like ``prev_timesteps``) None or 0: the deterministic step (eta = 0).
    ``prev_timesteps`` ``(B,)`` or ``(B, T)`` per position; a negative entry means "past the last step"
    and uses ``abar = 1`` (returns x0).
    """
    abar = _prev_alpha_bar(alphas_cumprod, prev_timesteps, x0_pred.device)
    var = 1.0 - abar if sigma is None else (1.0 - abar - sigma.to(abar) ** 2).clamp_min(0)
    direction = var.sqrt()
    return _per_sample(abar.sqrt(), x0_pred) * x0_pred + _per_sample(direction, x0_pred) * eps_pred


def consistency_scalings(
    timesteps: Tensor, *, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[Tensor, Tensor]:
    """LCM boundary-condition scalings ``(c_skip, c_out)`` for discrete timesteps, each ``(B,)``.

    With ``s = timestep_scaling * t``: ``c_skip = sigma_data^2 / (s^2 + sigma_data^2)`` and
    ``c_out = s / sqrt(s^2 + sigma_data^2)``, so ``c_skip(0) = 1``, ``c_out(0) = 0`` (``f(x, 0) = x``).
    """
    c_skip, c_out = _scalings64(timesteps, sigma_data, timestep_scaling)
    return c_skip.float(), c_out.float()


def _scalings64(timesteps: Tensor, sigma_data: float, timestep_scaling: float) -> tuple[Tensor, Tensor]:
    scaled = timesteps.to(torch.float64) * timestep_scaling
    denom = scaled.square() + sigma_data**2
    return sigma_data**2 / denom, scaled / denom.sqrt()


def consistency_output(
    sample_t: Tensor,
    x0_pred: Tensor,
    timesteps: Tensor,
    *,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
) -> Tensor:
    """The consistency function ``f(x_t, t) = c_skip(t) x_t + c_out(t) x0_pred``, ``(B, ...)``."""
    c_skip, c_out = _scalings64(timesteps, sigma_data, timestep_scaling)
    return _per_sample(c_skip, sample_t) * sample_t + _per_sample(c_out, x0_pred) * x0_pred


def consistency_loss(
    student_pred_x0: Tensor,
    target_pred_x0: Tensor,
    mask: Tensor | None = None,
    *,
    loss_type: str = "mse",
    huber_c: float = 0.001,
    reduction: Reduction = "mean",
    num_items: float | Tensor | None = None,
) -> Tensor:
    """Consistency-distillation loss between the student's ``f(x_t, t)`` and the target's ``f(x_{t-k}, t-k)``.

    ``loss_type="mse"``: ``(a - b)^2``; ``"huber"``: the pseudo-Huber ``sqrt((a - b)^2 + c^2) - c`` (LCM),
    element-wise and reduced over unmasked elements. The target (EMA model + teacher solver step) is
    detached: no gradient reaches it. Shapes ``(B, ...)``, mask over leading dims.
    """
    check_reduction(reduction)
    if student_pred_x0.shape != target_pred_x0.shape:
        raise ValueError("student and target predictions must have the same shape")
    diff = student_pred_x0 - target_pred_x0.detach()
    if loss_type == "mse":
        per = diff.square()
    elif loss_type == "huber":
        if not huber_c > 0:
            raise ValueError(f"huber_c must be > 0, got {huber_c}")
        per = torch.sqrt(diff.square() + huber_c**2) - huber_c
    else:
        raise ValueError(f"loss_type must be 'mse' or 'huber', got {loss_type!r}")
    return masked_reduce(per, mask, reduction, num_items)


@torch.no_grad()
def ema_update(target_params: Iterable[Tensor], online_params: Iterable[Tensor], decay: float) -> None:
    """In place on the target only: ``target <- decay * target + (1 - decay) * online``.

    Pass ``target_model.parameters()`` and ``online_model.parameters()`` (same order and shapes; also
    buffers if they should follow). ``decay`` in [0, 1]; 0 copies the online weights.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    targets, onlines = list(target_params), list(online_params)
    if len(targets) != len(onlines):
        raise ValueError(f"{len(targets)} target tensors but {len(onlines)} online tensors")
    for target, online in zip(targets, onlines):
        if target.shape != online.shape:
            raise ValueError(f"shape mismatch in ema_update: {tuple(target.shape)} vs {tuple(online.shape)}")
        if target.is_floating_point():
            target.lerp_(online.to(target.dtype), 1.0 - decay)
        else:
            target.copy_(online)
