"""The shared loss core: every divergence and distillation loss of embodied_distill, in one place.

Pure functions with explicit masks and reductions (``mask=None, reduction="mean"|"sum"|"none"``,
``num_items=`` for gradient accumulation); every loss ends in :func:`masked_reduce`. S = student,
T = teacher; the teacher side is detached. Directions are stated in each docstring:
``forward_kl`` = KL(T || S), ``reverse_kl`` = KL(S || T), ``generalized_jsd(beta=0)`` = KL(T || S),
``generalized_jsd(beta=1)`` = KL(S || T). Robot methods (``distill/``) and the language-model OPD
code (``lm/``) import from here and never define a loss of their own.

Which paper's loss is which function:

=================================  ==================================================================
Method                             Functions
=================================  ==================================================================
GKD (TRL GKDTrainer)               ``generalized_jsd`` (beta), ``chunked_divergence`` /
                                   ``chunked_divergence_from_hidden`` for long sequences, ``topk_jsd``
MiniLLM / Thinking Machines OPD    ``reverse_kl`` (full vocab); on sampled tokens ``sampled_kl_k1``,
                                   ``sampled_kl_k3`` (logging), ``opd_advantage`` + ``ppo_clip_loss``
                                   or ``sampled_reverse_kl_surrogate`` (gradient)
DistiLLM                           ``skew_forward_kl``, ``skew_reverse_kl`` (alpha = 0.1)
TAID                               ``taid_loss``, ``taid_target_log_probs``, ``taid_linear_t``,
                                   ``taid_update`` / ``TaidState`` (t: 0.4 -> 1.0)
TIP                                ``token_entropy``, ``tip_quadrants``, ``tip_select`` -> loss mask
G-OPD / ExOPD                      ``exopd_advantage`` (reward_scale = lambda > 1)
SCOPE                              ``perplexity_weights`` (teacher ppl, ``invert=True``, on incorrect
                                   rollouts x KL; student ppl on correct rollouts x MLE),
                                   ``sequence_log_perplexity``
Lightning OPD (offline teacher)    ``teacher_topk`` (build the cache), ``precomputed_topk_divergence``,
                                   ``chunked_divergence_from_hidden(teacher_topk=...)``
Top-k teacher logits               ``topk_forward_kl``, ``topk_reverse_kl``, ``topk_jsd``
                                   (``tail="bucket"`` or ``"renorm"``)
Logit standardisation (KD)         ``standardize_logits``
RPD                                ``ppo_clip_loss``, ``clipped_value_loss``, ``entropy_bonus``,
                                   ``compute_gae``, ``normalize_advantages`` + distillation term
                                   ``masked_mse`` (default) / ``masked_l1`` / ``gaussian_nll`` /
                                   ``gaussian_kl`` (KL(S || T))
COMPASS                            residual PPO as RPD; specialist -> generalist distillation
                                   ``gaussian_kl(mu_T, log_std_T, mu_S, log_std_S)`` = KL(T || S),
                                   or ``masked_mse``
VLA-OPD                            token-level ``reverse_kl`` over the 256 action bins per dimension,
                                   or ``opd_advantage`` / ``sampled_kl_k3`` on sampled action tokens
RL-100                             ``ppo_clip_loss`` per denoising step of ``ddim_step`` +
                                   ``ddim_sigma`` (stochastic DDIM), ``expectile_loss`` (IQL
                                   critic), ``compute_gae`` (online), ``denoising_loss`` (BC),
                                   ``consistency_loss`` + ``consistency_output`` + ``ddim_step`` +
                                   ``ema_update`` (consistency head)
Diffusion Policy                   ``denoising_loss`` (``prediction_type="epsilon"``), ``add_noise``
Consistency Policy / LCM           ``consistency_scalings`` (c_skip, c_out; sigma_data = 0.5,
                                   timestep_scaling = 10), ``consistency_output``,
                                   ``consistency_loss`` (mse / pseudo-Huber), ``ema_update``,
                                   ``predict_x0``, ``ddim_step``
=================================  ==================================================================
"""

from .chunked import CHUNKABLE, chunked_divergence, chunked_divergence_from_hidden
from .continuous import gaussian_kl, gaussian_nll, masked_l1, masked_mse
from .diffusion import (
    add_noise,
    consistency_loss,
    consistency_output,
    consistency_scalings,
    ddim_sigma,
    ddim_step,
    denoising_loss,
    diffusion_target,
    ema_update,
    predict_x0,
)
from .divergences import (
    DIVERGENCES,
    forward_kl,
    generalized_jsd,
    get_divergence,
    log_prob_pair,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from .policy_gradient import (
    clipped_value_loss,
    compute_gae,
    entropy_bonus,
    normalize_advantages,
    ppo_clip_loss,
    ppo_stats,
)
from .reduce import expand_mask, masked_reduce, reduction_weights
from .sampled import (
    opd_advantage,
    sampled_kl,
    sampled_kl_k1,
    sampled_kl_k3,
    sampled_reverse_kl_surrogate,
    token_log_probs,
)
from .topk import precomputed_topk_divergence, teacher_topk, topk_forward_kl, topk_jsd, topk_reverse_kl
from .value import expectile_loss
from .weighting import (
    HIGH_ENTROPY_HIGH_DIVERGENCE,
    HIGH_ENTROPY_LOW_DIVERGENCE,
    LOW_ENTROPY_HIGH_DIVERGENCE,
    LOW_ENTROPY_LOW_DIVERGENCE,
    TaidState,
    exopd_advantage,
    perplexity_weights,
    sequence_log_perplexity,
    standardize_logits,
    taid_linear_t,
    taid_loss,
    taid_target_log_probs,
    taid_update,
    tip_quadrants,
    tip_select,
    token_entropy,
)

__all__ = [
    "CHUNKABLE",
    "DIVERGENCES",
    "HIGH_ENTROPY_HIGH_DIVERGENCE",
    "HIGH_ENTROPY_LOW_DIVERGENCE",
    "LOW_ENTROPY_HIGH_DIVERGENCE",
    "LOW_ENTROPY_LOW_DIVERGENCE",
    "TaidState",
    "add_noise",
    "chunked_divergence",
    "chunked_divergence_from_hidden",
    "clipped_value_loss",
    "compute_gae",
    "consistency_loss",
    "consistency_output",
    "consistency_scalings",
    "ddim_sigma",
    "ddim_step",
    "denoising_loss",
    "diffusion_target",
    "ema_update",
    "entropy_bonus",
    "exopd_advantage",
    "expand_mask",
    "expectile_loss",
    "forward_kl",
    "gaussian_kl",
    "gaussian_nll",
    "generalized_jsd",
    "get_divergence",
    "log_prob_pair",
    "masked_l1",
    "masked_mse",
    "masked_reduce",
    "normalize_advantages",
    "opd_advantage",
    "perplexity_weights",
    "ppo_clip_loss",
    "ppo_stats",
    "precomputed_topk_divergence",
    "predict_x0",
    "reduction_weights",
    "reverse_kl",
    "sampled_kl",
    "sampled_kl_k1",
    "sampled_kl_k3",
    "sampled_reverse_kl_surrogate",
    "sequence_log_perplexity",
    "skew_forward_kl",
    "skew_reverse_kl",
    "standardize_logits",
    "taid_linear_t",
    "taid_loss",
    "taid_target_log_probs",
    "taid_update",
    "teacher_topk",
    "tip_quadrants",
    "tip_select",
    "token_entropy",
    "token_log_probs",
    "topk_forward_kl",
    "topk_jsd",
    "topk_reverse_kl",
    "total_variation",
]
