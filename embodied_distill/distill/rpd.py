"""RPD, Refined Policy Distillation: PPO whose student is pulled toward a teacher on its own states.

Reference: Refined-Policy-Distillation/RPD (``src/rpd/ppo_rgb_rpd.py``), see
``shared/reference/methods.md``. Loss per PPO minibatch (teacher queried for that minibatch)::

    loss = pg_loss - c_ent * entropy + c_v * v_loss + lambda(t) * L_distill(student, teacher)

with ``L_distill`` one of ``mse`` (default, MSE(student mean, teacher action)), ``l1``, ``bc_nll``
(``-log pi_student(teacher action)``) or ``gaussian_kl`` (KL(student || teacher) with the teacher's
Gaussian from several samples, std floored), all from the loss core, and ``lambda(t)`` constant or
cosine-annealed to 0 (``0.5 cos(pi t / T) + 0.5``). ``distill_coef=0`` is plain PPO (the baseline).
Two additions, off by default: a distillation replay (:class:`DistillReplay`: earlier visited states with
their teacher labels join each minibatch's ``L_distill``) and a critic warm-up (no policy-gradient term
for the first ``critic_warmup_steps``).

stable-baselines3 is the RL engine: its PPO collects rollouts with GAE; :class:`RPDPPO` replaces only
``train()`` with the update above. Reads top to bottom: (1) teacher, (2) env + student, (3) training in
chunks with periodic evaluation and an atomic training state, (4) checkpoint, (5) final evaluation on
unseen seeds -> ``report.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from embodied_distill.checkpoint import load_train_state, save_train_state
from embodied_distill.dataclass_config import dataclass_from_cfg
from embodied_distill.logging import MetricLogger
from embodied_distill.losses import (
    clipped_value_loss,
    entropy_bonus,
    gaussian_kl,
    gaussian_nll,
    masked_l1,
    masked_mse,
    normalize_advantages,
    ppo_clip_loss,
    ppo_stats,
)

DISTILL_LOSSES = ("mse", "l1", "bc_nll", "gaussian_kl")


@dataclasses.dataclass
class RPDConfig:
    """The ``distill`` config group of ``rpd`` and ``residual_rl`` (PPO settings + distillation term)."""

    name: str = "rpd"
    """Method name (``rpd`` or ``residual_rl``)."""
    total_steps: int = 100_000
    """Env steps of training (summed over envs)."""
    num_envs: int = 1
    """Parallel training envs (1: DummyVecEnv in-process, fastest on a busy 2-core CPU; >1: subprocesses)."""
    n_steps: int = 500
    """Rollout length per env between PPO updates (a multiple of the episode length keeps updates aligned)."""
    batch_size: int = 50
    """PPO minibatch size (the teacher is queried once per minibatch)."""
    n_epochs: int = 10
    """Passes over each rollout."""
    lr: float = 3e-4
    """Adam learning rate (constant)."""
    gamma: float = 0.8
    """Discount (RPD's ManiSkill default)."""
    gae_lambda: float = 0.9
    """GAE lambda."""
    clip_range: float = 0.2
    """PPO ratio clip."""
    clip_range_vf: float | None = None
    """Value clip around the old values (None: plain 0.5 * (V - R)^2)."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient."""
    vf_coef: float = 0.5
    """Value loss coefficient."""
    max_grad_norm: float = 0.5
    """Gradient norm clip."""
    target_kl: float | None = 0.2
    """Stop an update's epochs early when approx KL exceeds 1.5 x this (None: never)."""
    normalize_advantage: bool = True
    """Standardise advantages per minibatch."""
    critic_warmup_steps: int = 0
    """Env steps at the start without the policy-gradient and entropy terms: the value function trains
    (and the distillation term, which needs no critic, pulls the student toward the teacher) before
    advantages from a still-random critic can push a residual or teacher-guided actor around. The
    ``target_kl`` early stop, which bounds policy-gradient steps, does not cut warm-up updates short."""
    distill_loss: str = "mse"
    """L_distill: mse | l1 | bc_nll | gaussian_kl."""
    distill_coef: float = 1.0
    """lambda; 0 gives plain PPO (no teacher queries)."""
    distill_schedule: str = "constant"
    """constant | cosine (lambda * (0.5 cos(pi t / T) + 0.5), annealed to 0 at total_steps)."""
    teacher_samples: int = 1
    """Teacher samples per state for gaussian_kl (a stochastic teacher gives a spread; >= 1)."""
    teacher_min_std: float = 0.05
    """Floor on the teacher's std for gaussian_kl (a deterministic teacher has std = this floor)."""
    distill_buffer_size: int = 0
    """States the student visited in earlier rollouts, kept with their teacher labels (a FIFO over the
    most recent ones; 0: none, RPD's original update, where L_distill sees the current rollout only)."""
    distill_replay_batch: int = 0
    """States drawn from that buffer per minibatch and added to the minibatch's L_distill (DAgger-style
    aggregation: the imitation keeps seeing every phase of the task, not only the last 500 steps)."""
    hidden_dims: tuple[int, ...] = (256, 256)
    """Actor and critic hidden widths (same network for PPO, RPD and the residual head)."""
    activation: str = "tanh"
    """Hidden activation."""
    log_std_init: float = -0.5
    """Initial log std of the Gaussian policy."""
    net_obs_horizon: int = 1
    """States the student reads (the env carries max(this, teacher's obs_horizon) for the teacher)."""
    residual_scale: float = 0.25
    """residual_rl only: multiplier on the residual action."""
    eval_every: int = 5000
    """Env steps between evaluations of the deterministic student (rounded up to whole rollouts)."""
    eval_episodes: int = 20
    """Episodes per periodic evaluation (seeds eval.seed_start + 10000 + i, disjoint from the final ones)."""
    train_seed_start: int = 1_000_000
    """First reset seed of the training episodes (+ 10000 * seed); must lie above eval seeds."""
    keep_best: bool = False
    """Model selection on the periodic (validation) evaluations: also evaluate the starting policy, and
    end with the weights of the best one (the earliest among equals) instead of the last. For residual
    RL the start is the base itself, so a specialist never ends below its base on the validation
    seeds. The final evaluation runs on ``eval.seed_start`` seeds, disjoint from the validation ones."""
    keep_best_confirm_episodes: int = 0
    """keep_best only (0: off): when the best validated weights are not the last ones, evaluate both again
    on this many fresh seeds (``eval.seed_start + 20000 + i``, disjoint from the validation and the final
    seeds) and end with the better (the kept ones on a tie). The best of many small, noisy validations is
    biased upward: on the 15-demo panda base, 20-episode validations kept 60k-step weights that scored 0.17
    on 200 test seeds, where the last (300k) weights scored 0.33 (README, COMPASS)."""

    def __post_init__(self):
        self.hidden_dims = tuple(self.hidden_dims)
        if self.total_steps < 1 or self.n_steps < 1 or self.num_envs < 1 or self.n_epochs < 1:
            raise ValueError("total_steps, n_steps, num_envs and n_epochs must be >= 1")
        if self.keep_best_confirm_episodes < 0:
            raise ValueError("keep_best_confirm_episodes must be >= 0")
        if not 1 <= self.batch_size <= self.n_steps * self.num_envs:
            raise ValueError(f"batch_size must be in [1, n_steps * num_envs = "
                             f"{self.n_steps * self.num_envs}]")
        if not 0.0 < self.gamma <= 1.0 or not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError("gamma must be in (0, 1] and gae_lambda in [0, 1]")
        if self.lr <= 0 or self.clip_range <= 0 or self.max_grad_norm <= 0:
            raise ValueError("lr, clip_range and max_grad_norm must be > 0")
        if self.distill_loss not in DISTILL_LOSSES:
            raise ValueError(f"distill_loss must be one of {DISTILL_LOSSES}, got {self.distill_loss!r}")
        if self.distill_coef < 0 or self.ent_coef < 0 or self.vf_coef < 0:
            raise ValueError("distill_coef, ent_coef and vf_coef must be >= 0")
        if self.distill_schedule not in ("constant", "cosine"):
            raise ValueError(f"distill_schedule must be constant or cosine, got {self.distill_schedule!r}")
        if self.teacher_samples < 1 or self.teacher_min_std <= 0:
            raise ValueError("teacher_samples must be >= 1 and teacher_min_std > 0")
        if self.eval_every < 1 or self.eval_episodes < 1:
            raise ValueError("eval_every and eval_episodes must be >= 1")
        if self.critic_warmup_steps < 0:
            raise ValueError("critic_warmup_steps must be >= 0")
        if self.distill_buffer_size < 0 or self.distill_replay_batch < 0:
            raise ValueError("distill_buffer_size and distill_replay_batch must be >= 0")
        if (self.distill_buffer_size > 0) != (self.distill_replay_batch > 0):
            raise ValueError("distill_buffer_size and distill_replay_batch are set together (both > 0) "
                             "or not at all (both 0)")

    @classmethod
    def from_cfg(cls, dcfg: DictConfig | dict) -> RPDConfig:
        return dataclass_from_cfg(cls, dcfg, "distill config")


# ---------------------------------------------------------------------------- the loss
def distill_coef_at(step: int, cfg: RPDConfig) -> float:
    """lambda at env step ``step``: constant, or cosine-annealed from ``distill_coef`` to 0 at total_steps."""
    if cfg.distill_schedule == "constant":
        return cfg.distill_coef
    t = min(1.0, step / cfg.total_steps)
    return cfg.distill_coef * (0.5 * math.cos(math.pi * t) + 0.5)


def distill_term(kind: str, mean: Tensor, log_std: Tensor, teacher_mean: Tensor,
                 teacher_log_std: Tensor | None = None) -> Tensor:
    """L_distill from the loss core. ``mean`` (B, Da), ``log_std`` (Da,) or (B, Da): the student's
    Gaussian; ``teacher_mean`` (B, Da) (detached here); ``teacher_log_std`` (B, Da), for gaussian_kl."""
    target = teacher_mean.detach()
    if kind == "mse":
        return masked_mse(mean, target)
    if kind == "l1":
        return masked_l1(mean, target)
    if kind == "bc_nll":  # -log pi_S(teacher action)
        return gaussian_nll(target, mean, log_std.expand_as(mean))
    if kind == "gaussian_kl":  # KL(student || teacher)
        if teacher_log_std is None:
            raise ValueError("gaussian_kl needs the teacher's log std")
        return gaussian_kl(mean, log_std.expand_as(mean), target, teacher_log_std.detach())
    raise ValueError(f"unknown distill loss {kind!r}; choose from {DISTILL_LOSSES}")


def rpd_loss(*, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, values: Tensor,
             old_values: Tensor, returns: Tensor, entropy: Tensor, mean: Tensor, log_std: Tensor,
             teacher_mean: Tensor | None, teacher_log_std: Tensor | None, cfg: RPDConfig,
             lam: float, critic_warmup: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO + lambda * L_distill on one minibatch. Per-sample tensors are (B,); ``mean``/``teacher_mean``
    (B, Da). With ``lam == 0`` (or no teacher) the result is exactly the PPO loss; with ``critic_warmup``
    the policy-gradient and entropy terms are left out (``vf_coef * value loss + lambda * L_distill``).

    Returns ``(loss, terms)`` with detached terms: pg, value, entropy, distill, approx_kl, clip_fraction.
    """
    adv = normalize_advantages(advantages) if cfg.normalize_advantage and advantages.numel() > 1 \
        else advantages
    pg = ppo_clip_loss(log_prob, old_log_prob, adv, clip=cfg.clip_range)
    v_loss = clipped_value_loss(values, old_values, returns, clip=cfg.clip_range_vf)
    ent = entropy_bonus(entropy, coef=cfg.ent_coef)
    loss = cfg.vf_coef * v_loss if critic_warmup else pg + cfg.vf_coef * v_loss + ent
    terms = {"pg_loss": pg.detach(), "value_loss": v_loss.detach(), "entropy": entropy.mean().detach(),
             **ppo_stats(log_prob, old_log_prob, clip=cfg.clip_range)}
    if lam > 0 and teacher_mean is not None:
        d = distill_term(cfg.distill_loss, mean, log_std, teacher_mean, teacher_log_std)
        loss = loss + lam * d
        terms["distill_loss"] = d.detach()
    return loss, terms


# ---------------------------------------------------------------------------- teacher
def load_teacher(tcfg: DictConfig | None, device: torch.device):
    """The ``teacher`` config group -> a Policy-contract object (or None for ``teacher=none``).

    ``path: DIR`` loads a local checkpoint; ``_target_`` instantiates any object with
    ``predict_action_chunk`` (e.g. a remote policy client).
    """
    if tcfg is None or tcfg.get("name", "none") == "none":
        return None
    if tcfg.get("_target_"):
        from hydra.utils import instantiate

        teacher = instantiate(tcfg)
    else:
        from embodied_distill.policies.base import load_policy

        if not tcfg.get("path"):
            raise ValueError("teacher=checkpoint needs teacher.path=<checkpoint dir>")
        teacher = load_policy(tcfg.path, device=tcfg.get("device", "cpu"))[0]
    if not hasattr(teacher, "predict_action_chunk"):
        raise TypeError(f"teacher {type(teacher).__name__} does not implement predict_action_chunk")
    return teacher


def teacher_obs_horizon(teacher, tcfg: DictConfig | None) -> int:
    cfg = getattr(teacher, "config", None)
    return int(getattr(cfg, "obs_horizon", None) or (tcfg or {}).get("obs_horizon", 1))


@torch.no_grad()
def query_teacher(teacher, obs: Tensor, obs_dim: int, history: int, horizon: int, low: float, high: float,
                  samples: int = 1, min_std: float = 0.05) -> tuple[Tensor, Tensor]:
    """Flat obs (B, F) -> teacher (mean (B, Da), log_std (B, Da)) from its first predicted action.

    The teacher sees its last ``horizon`` states ``{"state": (B, horizon, Ds)}`` taken from the
    ``history`` frames of the layout; ``samples`` calls (a stochastic teacher) give a mean and a std.
    """
    states = obs[:, : history * obs_dim].reshape(obs.shape[0], history, obs_dim)[:, history - horizon:]
    dev = obs.device
    draws = []
    for _ in range(samples):
        chunk = teacher.predict_action_chunk({"state": states.cpu()})
        draws.append(torch.as_tensor(chunk)[:, 0].to(dev, torch.float32).clamp(low, high))
    stack = torch.stack(draws)
    std = stack.std(0, unbiased=False) if samples > 1 else torch.zeros_like(stack[0])
    return stack.mean(0), std.clamp_min(min_std).log()


class DistillReplay:
    """A FIFO of visited flat states ``(N, F)`` with the teacher's labels (mean and log-std ``(N, Da)``),
    queried once when the states enter (the teacher is not re-queried when they are replayed)."""

    def __init__(self, capacity: int, flat_dim: int, action_dim: int):
        self.obs = torch.zeros(capacity, flat_dim)
        self.mean = torch.zeros(capacity, action_dim)
        self.log_std = torch.zeros(capacity, action_dim)
        self.capacity, self.size, self.pos = capacity, 0, 0

    def add(self, obs: Tensor, mean: Tensor, log_std: Tensor) -> None:
        """Append ``obs`` (N, F) with labels (N, Da), overwriting the oldest entries when full."""
        obs, mean, log_std = obs[-self.capacity:], mean[-self.capacity:], log_std[-self.capacity:]
        idx = (self.pos + torch.arange(obs.shape[0])) % self.capacity
        self.obs[idx], self.mean[idx], self.log_std[idx] = obs.cpu(), mean.cpu(), log_std.cpu()
        self.pos = (self.pos + obs.shape[0]) % self.capacity
        self.size = min(self.size + obs.shape[0], self.capacity)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``n`` entries drawn uniformly with replacement: (obs (n, F), mean (n, Da), log_std (n, Da))."""
        if self.size == 0:
            raise RuntimeError("the distillation replay buffer is empty")
        idx = torch.randint(0, self.size, (n,), generator=generator)
        return self.obs[idx], self.mean[idx], self.log_std[idx]

    def state_dict(self) -> dict[str, Any]:
        n = self.size
        order = (torch.arange(n) + (self.pos - n)) % self.capacity  # oldest first
        return {"obs": self.obs[order].clone(), "mean": self.mean[order].clone(),
                "log_std": self.log_std[order].clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size = self.pos = 0
        self.add(state["obs"], state["mean"], state["log_std"])


# ---------------------------------------------------------------------------- the learner
def make_learner_class():
    """SB3 PPO with ``train()`` replaced by the RPD update (built lazily: SB3 is optional)."""
    from stable_baselines3 import PPO

    class RPDPPO(PPO):
        """PPO whose update adds ``lambda * L_distill`` toward ``teacher`` on each minibatch."""

        def __init__(self, *args, rpd: RPDConfig, teacher=None, obs_dim: int = 0, history: int = 1,
                     teacher_horizon: int = 1, **kwargs):
            self.rpd, self.teacher = rpd, teacher
            self.obs_dim, self.history, self.teacher_horizon = obs_dim, history, teacher_horizon
            self.last_terms: dict[str, float] = {}
            super().__init__(*args, **kwargs)
            self.replay = DistillReplay(rpd.distill_buffer_size, self.observation_space.shape[0],
                                        self.action_space.shape[0]) \
                if rpd.distill_buffer_size > 0 and teacher is not None else None

        def _label(self, obs: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
            return query_teacher(self.teacher, obs, self.obs_dim, self.history, self.teacher_horizon, low,
                                 high, self.rpd.teacher_samples, self.rpd.teacher_min_std)

        def train(self) -> None:
            self.policy.set_training_mode(True)
            self._update_learning_rate(self.policy.optimizer)
            warmup = self.num_timesteps <= self.rpd.critic_warmup_steps
            lam = distill_coef_at(self.num_timesteps, self.rpd) if self.teacher is not None else 0.0
            low, high = float(self.action_space.low.min()), float(self.action_space.high.max())
            logs: dict[str, list[float]] = defaultdict(list)
            replay = self.replay if lam > 0 else None
            if replay is not None:  # this rollout's states join the buffer, labelled once
                flat = torch.as_tensor(self.rollout_buffer.observations).reshape(-1, self.replay.obs.shape[1])
                labels = [self._label(part.to(self.device), low, high) for part in flat.split(1024)]
                replay.add(flat, torch.cat([m for m, _ in labels]), torch.cat([s for _, s in labels]))
            stop = False
            for _epoch in range(self.n_epochs):
                for b in self.rollout_buffer.get(self.batch_size):
                    dist, mean, log_std, values = self.policy.distribution(b.observations)
                    t_mean = t_log_std = None
                    if lam > 0:
                        t_mean, t_log_std = self._label(b.observations, low, high)
                    if replay is not None:  # L_distill over the minibatch and earlier visited states
                        r_obs, r_mean, r_log_std = replay.sample(self.rpd.distill_replay_batch)
                        r_student = self.policy.model(r_obs.to(self.device))[0]  # (R, Da) actor mean
                        mean = torch.cat([mean, r_student])
                        t_mean = torch.cat([t_mean, r_mean.to(self.device)])
                        t_log_std = torch.cat([t_log_std, r_log_std.to(self.device)])
                    loss, terms = rpd_loss(
                        log_prob=dist.log_prob(b.actions), old_log_prob=b.old_log_prob,
                        advantages=b.advantages, values=values, old_values=b.old_values, returns=b.returns,
                        entropy=dist.entropy(), mean=mean, log_std=log_std, teacher_mean=t_mean,
                        teacher_log_std=t_log_std, cfg=self.rpd, lam=lam, critic_warmup=warmup)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite RPD loss at env step {self.num_timesteps}")
                    # the KL early stop bounds policy-gradient steps; a warm-up update has none
                    if not warmup and self.target_kl is not None \
                            and float(terms["approx_kl"]) > 1.5 * self.target_kl:
                        stop = True
                        break
                    self.policy.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    gn = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                    self.policy.optimizer.step()
                    for k, v in terms.items():
                        logs[k].append(float(v))
                    logs["loss"].append(float(loss.detach()))
                    logs["grad_norm"].append(float(gn))
                self._n_updates += 1
                if stop:
                    break
            model = self.policy.model
            if model.config.normalize_obs:  # after the update: the old log-probs used the old statistics
                obs = torch.as_tensor(self.rollout_buffer.observations).reshape(-1, model.config.flat_dim)
                last = (model.config.obs_horizon - 1) * self.obs_dim
                model.update_obs_stats(obs[:, last: last + self.obs_dim])
            self.last_terms = {k: float(np.mean(v)) for k, v in logs.items()}
            self.last_terms["distill_coef"] = lam
            self.last_terms["critic_warmup"] = float(warmup)
            self.last_terms["std"] = float(self.policy.model.log_std.detach().exp().mean())
            for k, v in self.last_terms.items():
                self.logger.record(f"train/{k}", v)

    return RPDPPO


# ---------------------------------------------------------------------------- shared run loop
def _prefix(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Name a group of tensors inside the training state's flat ``extra_tensors``."""
    return {f"{prefix}{k}": v for k, v in tensors.items()}


def _unprefix(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The group :func:`_prefix` stored under ``prefix``, with its own names back."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def train_rl(cfg: DictConfig, run_dir: Path, runner, device: torch.device, rcfg: RPDConfig, policy,
             make_env, teacher, history: int, teacher_horizon: int, tag: str) -> dict[str, Any]:
    """Train ``policy.actor_critic`` with :class:`RPDPPO` on ``make_env()`` envs in chunks of
    ``eval_every`` env steps; evaluate, log and save the training state after each chunk (resumable);
    then save the checkpoint and evaluate on ``eval.episodes`` unseen seeds. Returns the report."""
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    from embodied_distill.policies.rl.modeling_rl import sb3_policy_class
    from embodied_distill.sim.evaluation import evaluate_policy

    vec_cls = DummyVecEnv if rcfg.num_envs == 1 else SubprocVecEnv
    venv = vec_cls([make_env(i) for i in range(rcfg.num_envs)])
    learner = make_learner_class()(
        sb3_policy_class(), venv, learning_rate=rcfg.lr, n_steps=rcfg.n_steps, batch_size=rcfg.batch_size,
        n_epochs=rcfg.n_epochs, gamma=rcfg.gamma, gae_lambda=rcfg.gae_lambda, clip_range=rcfg.clip_range,
        clip_range_vf=rcfg.clip_range_vf, ent_coef=rcfg.ent_coef, vf_coef=rcfg.vf_coef,
        max_grad_norm=rcfg.max_grad_norm, target_kl=rcfg.target_kl,
        normalize_advantage=rcfg.normalize_advantage, policy_kwargs={"actor_critic": policy.actor_critic},
        seed=int(cfg.seed), device=device, verbose=0, rpd=rcfg, teacher=teacher,
        obs_dim=policy.config.obs_dim, history=history, teacher_horizon=teacher_horizon)
    state_dir, logger = run_dir / "train_state", MetricLogger(run_dir)
    resumed = load_train_state(state_dir) if cfg.resume else None
    if resumed is not None:
        policy.actor_critic.load_state_dict(resumed["model"])
        learner.policy.optimizer.load_state_dict(resumed["optimizer"])
        learner.num_timesteps = int(resumed["step"])
        replay_state = _unprefix(resumed["extra_tensors"], "replay.")
        if learner.replay is not None and replay_state:
            learner.replay.load_state_dict(replay_state)
        print(f"[{tag}] resuming from {state_dir} at env step {learner.num_timesteps}/{rcfg.total_steps} "
              "(weights, optimizer and step restored; the env restarts its episode)")
    per_rollout = rcfg.n_steps * rcfg.num_envs
    chunk = max(1, math.ceil(rcfg.eval_every / per_rollout)) * per_rollout
    eval_venv = runner.make_vec_env(num_envs=1)
    # the learning curve so far travels with the training state, so a resumed run reports all of it
    curve: list[dict[str, float]] = list(resumed["extra"].get("curve", [])) if resumed is not None else []
    t_start = time.perf_counter()
    val_seed = int(cfg.eval.seed_start) + 10_000

    def validate(episodes: int = rcfg.eval_episodes, seed_start: int = val_seed, desc: str = f"eval {tag}"):
        policy.eval()
        return evaluate_policy(policy, eval_venv, episodes, seed_start, runner.max_episode_steps, desc=desc)

    # keep_best: the best validated weights so far (step, success, actor-critic state), saved with the
    # training state so a resumed run keeps choosing among all of them
    best: dict[str, Any] | None = None
    confirm: dict[str, Any] | None = None  # keep_best_confirm_episodes: the kept vs the last weights

    def snapshot() -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in policy.actor_critic.state_dict().items()}

    try:
        if rcfg.keep_best and resumed is not None and "best_step" in resumed["extra"]:
            best = {"step": int(resumed["extra"]["best_step"]),
                    "success": float(resumed["extra"]["best_success"]),
                    "state": _unprefix(resumed["extra_tensors"], "best.")}
        elif rcfg.keep_best and learner.num_timesteps == 0:
            ev0 = validate()
            best = {"step": 0, "success": ev0["success_rate"], "state": snapshot()}
            curve.append({"env_steps": 0, "eval_success": ev0["success_rate"],
                          "eval_return": ev0["mean_return"], "wall_s": 0.0})
            print(f"[{tag}] keep_best: the starting policy validates at {ev0['success_rate']:.2f}")
        while learner.num_timesteps < rcfg.total_steps:
            t0, s0 = time.perf_counter(), learner.num_timesteps
            learner.learn(min(chunk, rcfg.total_steps - s0), reset_num_timesteps=False)
            fps = (learner.num_timesteps - s0) / (time.perf_counter() - t0)
            ev = validate()
            step = learner.num_timesteps
            if best is not None and ev["success_rate"] > best["success"]:
                best = {"step": step, "success": ev["success_rate"], "state": snapshot()}
            point = {"env_steps": step, "eval_success": ev["success_rate"], "eval_return": ev["mean_return"],
                     "wall_s": time.perf_counter() - t_start}
            curve.append(point)
            rollout_succ = [float(x) for x in learner.ep_success_buffer]
            rollout_ret = [float(e["r"]) for e in learner.ep_info_buffer]
            logger.log(step, {"eval/success_rate": ev["success_rate"], "eval/mean_return": ev["mean_return"],
                              "rollout/success_rate": float(np.mean(rollout_succ)) if rollout_succ else 0.0,
                              "rollout/mean_return": float(np.mean(rollout_ret)) if rollout_ret else 0.0,
                              "time/env_steps_per_s": fps,
                              **{f"train/{k}": v for k, v in learner.last_terms.items()}})
            print(f"[{tag}] {step}/{rcfg.total_steps} env steps: eval success {ev['success_rate']:.2f}, "
                  f"return {ev['mean_return']:.1f}, {fps:.0f} env steps/s, "
                  f"distill {learner.last_terms.get('distill_loss', float('nan')):.4f}")
            tensors = _prefix(learner.replay.state_dict(), "replay.") if learner.replay is not None else {}
            extra: dict[str, Any] = {"curve": curve}
            if best is not None:
                tensors.update(_prefix(best["state"], "best."))
                extra.update(best_step=best["step"], best_success=best["success"])
            save_train_state(state_dir, step, policy.actor_critic.state_dict(), learner.policy.optimizer,
                             extra_tensors=tensors or None, extra=extra)
        if best is not None and rcfg.keep_best_confirm_episodes > 0 and best["step"] != learner.num_timesteps:
            # the kept weights against the last ones, on fresh seeds (winner's curse of the validations)
            last, scores = snapshot(), {}
            for who, state in (("kept", best["state"]), ("last", last)):
                policy.actor_critic.load_state_dict(state)
                scores[who] = validate(rcfg.keep_best_confirm_episodes, int(cfg.eval.seed_start) + 20_000,
                                       f"confirm {tag} ({who})")["success_rate"]
            confirm = {"episodes": rcfg.keep_best_confirm_episodes, "kept_step": best["step"],
                       "kept_success": scores["kept"], "last_step": int(learner.num_timesteps),
                       "last_success": scores["last"]}
            if scores["last"] > scores["kept"]:
                best = {"step": confirm["last_step"], "success": curve[-1]["eval_success"], "state": last}
            print(f"[{tag}] keep_best confirm on {confirm['episodes']} fresh seeds: step "
                  f"{confirm['kept_step']} {scores['kept']:.2f}, last {scores['last']:.2f} "
                  f"-> step {best['step']}")
    finally:
        eval_venv.close()
        venv.close()
    train_wall = time.perf_counter() - t_start
    meta: dict[str, Any] = {"env_steps": int(learner.num_timesteps), "method": tag}
    if best is not None:
        policy.actor_critic.load_state_dict(best["state"])
        meta.update(selected_step=best["step"], selected_validation_success=best["success"])
        if confirm is not None:
            meta.update(keep_best_confirm=confirm)
        print(f"[{tag}] keep_best: ending with the weights of env step {best['step']} "
              f"(validation success {best['success']:.2f})")
    ckpt = policy.save_pretrained(run_dir / "checkpoint",
                                  train_config=OmegaConf.to_container(cfg, resolve=True), meta=meta)
    print(f"[{tag}] checkpoint written to {ckpt}")
    policy.to("cpu").eval()
    report = runner.evaluate(policy, cfg.eval.episodes, cfg.eval.seed_start, num_envs=cfg.eval.num_envs,
                             video_path=run_dir / "eval.mp4" if cfg.eval.video_episodes > 0 else None,
                             video_episodes=cfg.eval.video_episodes)
    report.update(checkpoint=str(ckpt), env_steps=int(learner.num_timesteps), train_wall_s=train_wall,
                  curve=curve, method=tag)
    if best is not None:
        report.update(selected_step=best["step"], selected_validation_success=best["success"])
        if confirm is not None:
            report.update(keep_best_confirm=confirm)
    logger.log(int(learner.num_timesteps), {"final/success_rate": report["success_rate"],
                                            "final/mean_return": report["mean_return"]})
    logger.close()
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def student_config(rcfg: RPDConfig, obs_dim: int, action_dim: int, history: int, low: float, high: float):
    from embodied_distill.policies.rl.configuration_rl import RLPolicyConfig

    return RLPolicyConfig(obs_dim=obs_dim, action_dim=action_dim, obs_horizon=history,
                          net_obs_horizon=rcfg.net_obs_horizon, hidden_dims=rcfg.hidden_dims,
                          activation=rcfg.activation, log_std_init=rcfg.log_std_init, action_low=low,
                          action_high=high)


def env_factory(runner, history: int, base, residual_scale: float, seed_start: int):
    """``make_env(i)`` -> a thunk building :class:`ManiSkillRLEnv` i (seeds 100000 apart per env)."""
    def make_env(i: int):
        def thunk():
            torch.set_num_threads(1)
            from embodied_distill.policies.rl.envs import ManiSkillRLEnv

            return ManiSkillRLEnv(runner.env_cfg, history=history, base=base, residual_scale=residual_scale,
                                  seed_start=seed_start + 100_000 * i)
        return thunk
    return make_env


def run(cfg: DictConfig, run_dir: Path, runner, device: torch.device) -> dict[str, Any]:
    rcfg = RPDConfig.from_cfg(cfg.distill)
    if not hasattr(runner, "env_cfg"):
        raise ValueError("rpd needs a ManiSkill runner (sim=maniskill)")
    # ---------------------------------------------------------------- 1. teacher (None: plain PPO)
    teacher = load_teacher(cfg.get("teacher"), device)
    if teacher is None and rcfg.distill_coef > 0:
        print("[rpd] no teacher (teacher=none): training plain PPO (distill_coef ignored)")
    t_horizon = teacher_obs_horizon(teacher, cfg.get("teacher")) if teacher is not None else 1
    history = max(rcfg.net_obs_horizon, t_horizon)
    seed_start = rcfg.train_seed_start + 10_000 * int(cfg.seed)
    if seed_start <= int(cfg.eval.seed_start) + 10_000 + rcfg.eval_episodes + int(cfg.eval.episodes):
        raise ValueError("distill.train_seed_start must lie above the evaluation seeds")
    # ---------------------------------------------------------------- 2. env + student
    make_env = env_factory(runner, history, None, 1.0, seed_start)
    probe = make_env(0)()
    obs_dim, action_dim = probe.obs_dim, probe.action_dim
    low, high = float(probe.low.min()), float(probe.high.max())
    probe.close()
    from embodied_distill.policies.rl.modeling_rl import RLPolicy

    policy = RLPolicy(student_config(rcfg, obs_dim, action_dim, history, low, high)).to(device)
    print(f"[rpd] student {sum(p.numel() for p in policy.parameters())} params, obs {obs_dim} x {history}, "
          f"teacher {type(teacher).__name__ if teacher is not None else None}, loss {rcfg.distill_loss}, "
          f"lambda {rcfg.distill_coef} ({rcfg.distill_schedule})")
    # ---------------------------------------------------------------- 3-5. train, checkpoint, evaluate
    return train_rl(cfg, run_dir, runner, device, rcfg, policy, make_env, teacher, history, t_horizon,
                    tag="rpd" if teacher is not None and rcfg.distill_coef > 0 else "ppo")
