"""VLA-OPD: on-policy distillation of a VLA's action tokens into a student VLA.

Project page only (no official code), see ``shared/reference/methods.md`` (VLA-OPD). The student VLA
acts in the LIBERO-style suite, sampling its own action tokens; the frozen teacher VLA scores every
observation the student visited; the loss is the token-level reverse KL(student || teacher) over each
action dimension's bin distribution, mode-seeking (it avoids the entropy blow-up of forward KL and the
collapse of hard cross-entropy). Every loss comes from the loss core (:mod:`embodied_distill.losses`):

=====================  ===================================================================================
``distill.loss``       per token (one per chunk step and action dimension, over the ``n_bins`` bins)
=====================  ===================================================================================
``reverse_kl``         ``reverse_kl`` KL(S || T), full bin distribution (default, VLA-OPD)
``forward_kl``         ``forward_kl`` KL(T || S)
``generalized_jsd``    ``generalized_jsd`` (``beta``: 0 = KL(T || S), 1 = KL(S || T))
``sampled_advantage``  ``opd_advantage`` r = log pi_T(a) - log pi_S(a) on the recorded tokens a, fed to
                       ``ppo_clip_loss`` with the recording-time student log-probs (a replayed sample is
                       slightly off-policy; the ratio clip bounds the step), as the public VLA-OPD fork
``hard_ce``            cross-entropy on the teacher's argmax bin, ``-token_log_probs(S, argmax T)`` (SFT)
=====================  ===================================================================================

Data: each training episode is driven by the student (on-policy) or by the teacher (greedy by default,
off-policy), the share of student-driven episodes being ``student_fraction`` (GKD's lambda; 0 with
``hard_ce`` is off-policy SFT on teacher rollouts, 1 is pure on-policy). Every decision point (one
action chunk) is stored with the observation the student saw, the tokens the driver emitted, the
student's log-probs of them and the teacher's logits, in a FIFO replay buffer of the most recent
``replay_capacity`` decisions; updates sample minibatches from it. The teacher is queried once per
decision point (its logits are stored), so "teacher queries" = decision points collected.

Pitfalls from the paper, enforced: teacher and student must share the action de-normalisation and the
tokenizer (checked in :func:`check_shared_action_space`, a loud error otherwise); a student at 0%
success never improves, so the student is warm-started by SFT on a few teacher rollouts (``sft_*``)
or loaded from a checkpoint (``student_path``).

Reads top to bottom: (1) teacher, (2) student (+ warm start), (3) on-policy iterations with periodic
evaluation and an atomic training state (resumable; the replay buffer restarts empty on resume),
(4) checkpoint, (5) final evaluation -> ``report.json``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from embodied_distill.checkpoint import load_train_state, save_train_state
from embodied_distill.dataclass_config import dataclass_from_cfg
from embodied_distill.losses import (
    get_divergence,
    masked_reduce,
    opd_advantage,
    ppo_clip_loss,
    reverse_kl,
    token_entropy,
    token_log_probs,
)

LOSSES = ("reverse_kl", "forward_kl", "generalized_jsd", "sampled_advantage", "hard_ce")


@dataclasses.dataclass
class VLAOPDConfig:
    """The ``distill`` config group of ``vla_opd``."""

    name: str = "vla_opd"
    """Method name."""
    loss: str = "reverse_kl"
    """reverse_kl | forward_kl | generalized_jsd | sampled_advantage | hard_ce (see the module docstring)."""
    beta: float = 0.5
    """generalized_jsd's beta in [0, 1] (0 = KL(T || S), 1 = KL(S || T))."""
    temperature: float = 1.0
    """Student sampling temperature in rollouts; the same temperature divides both logits in the loss."""
    teacher_temperature: float = 0.0
    """Teacher sampling temperature when it drives an episode (0: argmax, the teacher's own policy)."""
    ppo_clip: float = 0.2
    """Ratio clip of ``sampled_advantage``."""
    student_fraction: float = 1.0
    """Share of training episodes driven by the student, in [0, 1] (the rest: the teacher)."""
    iterations: int = 20
    """Collect-then-update iterations."""
    episodes_per_iter: int = 2
    """Episodes collected per iteration (cycling over ``train_tasks``)."""
    updates_per_iter: int = 20
    """Gradient steps per iteration, each on a minibatch drawn from the replay buffer."""
    batch_size: int = 32
    """Decision points per minibatch."""
    replay_capacity: int = 2000
    """Decision points kept in the FIFO replay buffer (the most recent ones)."""
    lr: float = 1e-4
    """AdamW learning rate (constant)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient norm clip."""
    train_tasks: tuple[str, ...] | None = None
    """Suite tasks trained on (names, e.g. ``[cube_behind_plate]``); None: every task of the runner.
    The others are evaluated as held-out tasks (forgetting)."""
    max_episode_steps: int | None = None
    """Step limit of training and evaluation episodes (None: each task's own). Episodes end at the
    first success (LIBERO's rule)."""
    sft_episodes: int = 0
    """Warm start: teacher-driven episodes collected before training (0: no warm start)."""
    sft_updates: int = 0
    """Warm start: hard cross-entropy steps on those episodes' teacher tokens."""
    sft_all_tasks: bool = True
    """Warm start on every task of the runner (True: held-out tasks start from a non-trivial success, so
    forgetting is measurable) or only on ``train_tasks``."""
    student_path: str | None = None
    """Load the student from this checkpoint (e.g. a small VLA trained with ``distill=bc``) instead of
    building it from the teacher's config with ``student_overrides``."""
    student_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """VLAPolicyConfig fields that make the student differ from the teacher (e.g. ``d_model: 64``,
    ``n_layers: 2``); the student gets the teacher's normaliser and tokenizer settings."""
    student_init_from_teacher: tuple[str, ...] = ()
    """Submodules whose weights a fresh student copies from the teacher (e.g. ``[vision]``: the image
    encoder, when its config is not overridden); every parameter under each prefix must match in shape.
    ``["*"]``: every parameter that matches in name and shape (with ``n_layers`` reduced: the teacher's
    first layers, encoders and head, a layer-dropped student)."""
    teacher_query_budget: int | None = None
    """Stop after the iteration at which the cumulative teacher queries reach this (None: run all
    ``iterations``); runs with equal budgets compare methods at equal teacher queries."""
    eval_every: int = 5
    """Iterations between evaluations of the greedy student (and at the start and the end)."""
    eval_episodes: int = 10
    """Episodes per task per periodic evaluation (the fixed evaluation initial states)."""
    eval_held_out: bool = True
    """Also evaluate the suite's tasks that are not trained on (forgetting), at the start and the end."""
    eval_at_start: bool = True
    """Evaluate the student before training (a benchmark that shares one initial student skips it)."""
    train_seed_start: int = 1_000_000
    """First reset seed of training episodes (+ 10000 * seed); must lie above the evaluation seeds."""

    def __post_init__(self):
        if self.train_tasks is not None:
            self.train_tasks = tuple(self.train_tasks)
        self.student_overrides = dict(self.student_overrides or {})
        self.student_init_from_teacher = tuple(self.student_init_from_teacher)
        if self.loss not in LOSSES:
            raise ValueError(f"distill.loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0.0 <= self.beta <= 1.0 or not 0.0 <= self.student_fraction <= 1.0:
            raise ValueError("beta and student_fraction must be in [0, 1]")
        if not self.temperature > 0 or self.teacher_temperature < 0 or not self.ppo_clip > 0:
            raise ValueError("temperature and ppo_clip must be > 0 and teacher_temperature >= 0")
        if min(self.iterations, self.episodes_per_iter, self.batch_size, self.replay_capacity) < 1:
            raise ValueError("iterations, episodes_per_iter, batch_size and replay_capacity must be >= 1")
        if self.updates_per_iter < 0 or self.sft_episodes < 0 or self.sft_updates < 0:
            raise ValueError("updates_per_iter, sft_episodes and sft_updates must be >= 0")
        if (self.sft_updates > 0) != (self.sft_episodes > 0):
            raise ValueError("a warm start needs both sft_episodes > 0 and sft_updates > 0")
        if self.lr <= 0 or self.grad_clip <= 0 or self.weight_decay < 0:
            raise ValueError("lr and grad_clip must be > 0, weight_decay >= 0")
        if self.eval_every < 1 or self.eval_episodes < 1:
            raise ValueError("eval_every and eval_episodes must be >= 1")
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise ValueError("max_episode_steps must be >= 1 (or null)")
        if self.teacher_query_budget is not None and self.teacher_query_budget < 1:
            raise ValueError("teacher_query_budget must be >= 1 (or null)")

    @classmethod
    def from_cfg(cls, dcfg: DictConfig | dict) -> VLAOPDConfig:
        return dataclass_from_cfg(cls, dcfg, "distill config")


# ---------------------------------------------------------------------------- teacher / student checks
def check_shared_action_space(student, teacher) -> None:
    """Raise ``ValueError`` unless student and teacher decode tokens to the same actions: the same chunk
    shape (Ta, Da), tokenizer (n_bins, low, high) and action normaliser (offset, scale)."""
    problems = []
    for field in ("action_horizon", "action_dim"):
        s, t = getattr(student.config, field), getattr(teacher.config, field)
        if s != t:
            problems.append(f"{field}: student {s} vs teacher {t}")
    for field in ("n_bins", "low", "high"):
        s, t = getattr(student.tokenizer, field), getattr(teacher.tokenizer, field)
        if s != t:
            problems.append(f"tokenizer.{field}: student {s} vs teacher {t}")
    for field in ("offset", "scale"):
        s = student.normalizer.params.get("action", {}).get(field)
        t = teacher.normalizer.params.get("action", {}).get(field)
        if s is None or t is None:
            problems.append(f"action normaliser {field} missing ({'student' if s is None else 'teacher'})")
        elif s.shape != t.shape or not torch.allclose(s, t, rtol=1e-5, atol=1e-6):
            problems.append(f"action normaliser {field}: student {s.tolist()} vs teacher {t.tolist()}")
    if problems:
        raise ValueError("teacher and student do not share the action de-normalisation, so their action "
                         "tokens mean different actions and token-level distillation is meaningless: "
                         + "; ".join(problems))


def build_student(teacher, overrides: dict[str, Any], copy_from_teacher: Sequence[str] = ()):
    """A fresh student VLA: the teacher's config with ``overrides``, the teacher's normaliser (a copy),
    the teacher's instruction standardiser (``text_norm`` statistics, copied and frozen: the student
    trains on a few tasks' instructions only) and the weights of the ``copy_from_teacher`` submodules
    (name prefixes, e.g. ``"vision"``)."""
    from embodied_distill.data.normalizer import Normalizer
    from embodied_distill.policies.base import build_policy

    cfg = teacher.policy_config_dict()
    name = cfg.pop("name")
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise ValueError(f"distill.student_overrides has unknown field(s) {unknown}; valid: {sorted(cfg)}")
    cfg.update(overrides)
    state = teacher.normalizer.state_dict()
    normalizer = Normalizer.from_state_dict({k: v.clone() for k, v in state.items()})
    student = build_policy(name, cfg, normalizer)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for prefix in copy_from_teacher:
        if prefix == "*":  # every tensor the student has under the same name and shape (a layer-dropped
            # student keeps the teacher's first layers, its encoders and its head)
            keys = [k for k in t_state if k in s_state and s_state[k].shape == t_state[k].shape]
            if not keys:
                raise ValueError("cannot copy '*' from the teacher: no parameter matches in name and shape")
            student.load_state_dict({k: t_state[k].clone() for k in keys}, strict=False)
            continue
        keys = [k for k in t_state if k.startswith(prefix + ".")]
        bad = [k for k in keys if k not in s_state or s_state[k].shape != t_state[k].shape]
        if not keys or bad:
            raise ValueError(f"cannot copy {prefix!r} from the teacher: "
                             + (f"mismatched parameters {bad[:5]}" if keys else "no such submodule"))
        student.load_state_dict({k: t_state[k].clone() for k in keys}, strict=False)
    if getattr(student.config, "text_norm", False):
        if not getattr(teacher.config, "text_norm", False):
            raise ValueError("the student standardises instructions (text_norm) but the teacher does not: "
                             "no statistics to copy; set student_overrides.text_norm=false")
        student.freeze_text_norm(teacher.text_norm.state_dict())
    return student


# ---------------------------------------------------------------------------- the loss
def vla_opd_loss(student_logits: Tensor, teacher_logits: Tensor, tokens: Tensor, old_logprobs: Tensor,
                 cfg: VLAOPDConfig, mask: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """The configured loss over every action token, and detached statistics.

    Args:
        student_logits: (B, Ta, Da, V), differentiable.
        teacher_logits: (B, Ta, Da, V) (treated as constant).
        tokens: (B, Ta, Da) the tokens the rollout emitted (``sampled_advantage`` only).
        old_logprobs: (B, Ta, Da) the student's log-probs of ``tokens`` when recorded (``sampled_advantage``).
        mask: None or (B,) / (B, Ta) / (B, Ta, Da) tokens to train on.

    Returns ``(loss, stats)``; stats: ``reverse_kl`` (exact KL(S || T) per token, mean), ``entropy``
    (student token entropy, nats, mean) at the loss temperature.
    """
    t = cfg.temperature
    if cfg.loss in ("reverse_kl", "forward_kl"):
        loss = get_divergence(cfg.loss)(student_logits, teacher_logits, mask, temperature=t)
    elif cfg.loss == "generalized_jsd":
        loss = get_divergence("generalized_jsd")(student_logits, teacher_logits, mask, beta=cfg.beta,
                                                 temperature=t)
    elif cfg.loss == "sampled_advantage":
        log_s = token_log_probs(student_logits, tokens, t)
        log_t = token_log_probs(teacher_logits.detach(), tokens, t)
        loss = ppo_clip_loss(log_s, old_logprobs, opd_advantage(old_logprobs, log_t, mask), mask,
                             clip=cfg.ppo_clip)
    else:  # hard_ce: SFT on the teacher's most likely bin (the loss core's token log-probs, reduced)
        target = teacher_logits.detach().argmax(-1)
        loss = masked_reduce(-token_log_probs(student_logits, target, t), mask, "mean")
    with torch.no_grad():
        stats = {"reverse_kl": float(reverse_kl(student_logits, teacher_logits, mask, temperature=t)),
                 "entropy": float(masked_reduce(token_entropy(student_logits, t), mask, "mean"))}
    return loss, stats


# ---------------------------------------------------------------------------- rollouts
@dataclasses.dataclass
class Decisions:
    """Decision points (one action chunk each) of rollouts, N rows.

    ``obs``: the student's observation ``{key: (N, To, ...)}`` (images stay uint8) and ``instruction``
    (N strings); ``tokens`` (N, Ta, Da) long: what the driver emitted; ``student_logprobs`` (N, Ta, Da):
    the student's log-probs of ``tokens`` at the loss temperature when recorded; ``teacher_logits``
    (N, Ta, Da, V); ``student_driven`` (N,) bool.
    """

    obs: dict[str, Tensor]
    instruction: list[str]
    tokens: Tensor
    student_logprobs: Tensor
    teacher_logits: Tensor
    student_driven: Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def tensors(self) -> dict[str, Tensor]:
        return {**{f"obs.{k}": v for k, v in self.obs.items()}, "tokens": self.tokens,
                "student_logprobs": self.student_logprobs, "teacher_logits": self.teacher_logits,
                "student_driven": self.student_driven}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], instruction: list[str]) -> Decisions:
        obs = {k[4:]: v for k, v in t.items() if k.startswith("obs.")}
        return cls(obs, instruction, t["tokens"], t["student_logprobs"], t["teacher_logits"],
                   t["student_driven"])

    @classmethod
    def cat(cls, parts: Sequence[Decisions]) -> Decisions:
        keys = parts[0].tensors().keys()
        return cls.from_tensors({k: torch.cat([p.tensors()[k] for p in parts]) for k in keys},
                                [s for p in parts for s in p.instruction])

    def student_obs(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        return {**{k: v.to(device) for k, v in self.obs.items()}, "instruction": list(self.instruction)}


class ReplayBuffer:
    """FIFO ring of the most recent ``capacity`` decision points (CPU tensors, allocated on first add)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity, self.size, self.pos = capacity, 0, 0
        self.storage: dict[str, Tensor] = {}
        self.instruction: list[str] = [""] * capacity

    def __len__(self) -> int:
        return self.size

    def add(self, d: Decisions) -> None:
        t = d.tensors()
        if not self.storage:
            self.storage = {k: v.new_empty((self.capacity, *v.shape[1:])) for k, v in t.items()}
        for i in range(len(d)):  # decisions per call are few; a row copy each keeps the ring simple
            for k, v in t.items():
                self.storage[k][self.pos] = v[i]
            self.instruction[self.pos] = d.instruction[i]
            self.pos = (self.pos + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def sample(self, n: int, generator: torch.Generator) -> Decisions:
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = torch.randint(self.size, (n,), generator=generator)
        return Decisions.from_tensors({k: v[idx] for k, v in self.storage.items()},
                                      [self.instruction[i] for i in idx.tolist()])


def sample_tokens(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """(..., V) logits -> (...) bins: argmax at temperature 0, else a draw from softmax(logits / T)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return flat.reshape(logits.shape[:-1])


def tokens_to_actions(policy, tokens: Tensor) -> Tensor:
    """(B, Ta, Da) tokens -> (B, Ta, Da) actions in data units (bin centres, de-normalised)."""
    return policy.normalizer.unnormalize("action", policy.tokenizer.decode(tokens).float())


def model_obs(history: deque, policy) -> dict[str, Any]:
    """The last ``policy.config.obs_horizon`` per-step observations -> ``{key: (N, To, ...)}`` for the
    policy's ``obs_keys`` (images stay as the env gives them, e.g. (N, To, V, H, W, 3) uint8), plus
    ``instruction`` (N strings). ``history`` holds per-step dicts (tensors), oldest first."""
    frames = list(history)[-policy.config.obs_horizon:]
    while len(frames) < policy.config.obs_horizon:  # episode start: repeat the first frame
        frames.insert(0, frames[0])
    keys = [k for k in policy.config.obs_keys if k != "instruction"]
    obs: dict[str, Any] = {k: torch.stack([f[k] for f in frames], dim=1) for k in keys}
    obs["instruction"] = list(frames[-1]["instruction"])
    return obs


@torch.no_grad()
def rollout(venv, student, teacher, seeds: Sequence[int], max_steps: int, *, driver: str = "student",
            temperature: float = 1.0, teacher_temperature: float = 0.0,
            generator: torch.Generator | None = None, record: bool = True) -> tuple[Decisions | None, dict]:
    """Run one wave of ``venv.num_envs`` episodes (seeds ``seeds``) until each first succeeds or reaches
    ``max_steps``, re-planning every ``n_action_steps`` of the driver.

    ``driver="student"`` samples the student's tokens at ``temperature`` (0: argmax); ``"teacher"``
    takes the teacher's at ``teacher_temperature``. With ``record`` the teacher scores every decision
    point of every running episode and the decision points are returned (else ``None``, no teacher call).

    Returns ``(decisions, stats)``; stats: ``success`` (list of bool), ``env_steps`` (steps of running
    episodes), ``teacher_queries`` (observations the teacher scored or acted on), ``entropy`` (mean
    student token entropy at ``temperature`` over the decision points, student-driven only).
    """
    from embodied_distill.sim.evaluation import policy_obs

    if driver not in ("student", "teacher"):
        raise ValueError(f"driver must be 'student' or 'teacher', got {driver!r}")
    if driver == "teacher" or record:
        if teacher is None:
            raise ValueError("a teacher is needed to drive or to score rollouts")
    n = venv.num_envs
    actor = student if driver == "student" else teacher
    horizon = max(student.config.obs_horizon, teacher.config.obs_horizon if teacher is not None else 1)
    history: deque = deque(maxlen=horizon)
    history.append(policy_obs(venv.reset(list(seeds))))
    running = np.ones(n, bool)
    success = np.zeros(n, bool)
    parts: list[Decisions] = []
    env_steps = queries = 0
    entropies: list[float] = []
    t = 0
    while t < max_steps and running.any():
        s_obs = model_obs(history, student)
        live = torch.as_tensor(running)
        loss_t = temperature if temperature > 0 else 1.0
        t_logits = None
        if driver == "teacher" or record:
            t_logits = teacher.action_distribution(model_obs(history, teacher)).float()
            queries += int(running.sum())
        if driver == "student" or record:
            s_logits = student.action_distribution(s_obs).float()
            if driver == "student":
                entropies.append(float(token_entropy(s_logits[live], loss_t).mean()))
        if driver == "student":
            tokens = sample_tokens(s_logits, temperature, generator)
        else:
            tokens = sample_tokens(t_logits, teacher_temperature, generator)
        if record:
            keep = live.nonzero().squeeze(1)
            parts.append(Decisions(
                obs={k: v[keep].cpu() for k, v in s_obs.items() if k != "instruction"},
                instruction=[s_obs["instruction"][i] for i in keep.tolist()],
                tokens=tokens[keep].cpu(),
                student_logprobs=token_log_probs(s_logits, tokens, loss_t)[keep].cpu(),
                teacher_logits=t_logits[keep].cpu(),
                student_driven=torch.full((len(keep),), driver == "student", dtype=torch.bool)))
        actions = tokens_to_actions(actor, tokens).cpu().numpy()
        for j in range(min(actor.config.n_action_steps, max_steps - t)):
            obs, _, succ = venv.step(actions[:, j])
            env_steps += int(running.sum())
            success |= succ & running
            running &= ~succ
            t += 1
            history.append(policy_obs(obs))
            if not running.any():
                break
    stats = {"success": success.tolist(), "env_steps": env_steps, "teacher_queries": queries,
             "entropy": float(np.mean(entropies)) if entropies else float("nan")}
    return (Decisions.cat(parts) if record and parts else None), stats


# ---------------------------------------------------------------------------- evaluation
def task_indices(runner, names: Sequence[str] | None) -> list[int]:
    """Indices into ``runner.specs`` of the named tasks (None: all); unknown names list the valid ones."""
    all_names = [s.name for s in runner.specs]
    if names is None:
        return list(range(len(all_names)))
    unknown = [x for x in names if x not in all_names]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} in distill.train_tasks; this runner has {all_names}")
    return [all_names.index(x) for x in names]


def steps_limit(runner, index: int, cfg: VLAOPDConfig) -> int:
    return cfg.max_episode_steps or runner.steps_for(index)


def evaluate_tasks(student, runner, indices: Sequence[int], episodes: int, seed_start: int,
                   cfg: VLAOPDConfig, num_envs: int = 1) -> dict[str, float]:
    """Greedy student success rate per task (``{task name: rate}``) on the fixed initial states
    ``seed_start ... + episodes - 1``; episodes end at their first success."""
    student.eval()
    out = {}
    for i in indices:
        venv = runner.make_vec_env(num_envs=min(num_envs, episodes), task_index=i)
        wins = 0
        try:
            for start in range(0, episodes, venv.num_envs):
                seeds = [seed_start + start + k for k in range(venv.num_envs)]
                _, st = rollout(venv, student, None, seeds, steps_limit(runner, i, cfg), temperature=0.0,
                                record=False)
                wins += sum(st["success"][: episodes - start])
        finally:
            venv.close()
        out[runner.specs[i].name] = wins / episodes
    return out


# ---------------------------------------------------------------------------- training
def driver_schedule(episode: int, fraction: float) -> str:
    """Who drives training episode ``episode``: exactly ``fraction`` of every run of episodes, spread
    evenly (``floor((e + 1) f) > floor(e f)``: student)."""
    return "student" if int((episode + 1) * fraction) > int(episode * fraction) else "teacher"


def update(student, optimizer: torch.optim.Optimizer, buffer: ReplayBuffer, cfg: VLAOPDConfig, steps: int,
           generator: torch.Generator, device: torch.device, loss_cfg: VLAOPDConfig | None = None
           ) -> dict[str, float]:
    """``steps`` AdamW steps on minibatches from ``buffer``; mean loss / KL / entropy / grad norm."""
    lcfg = loss_cfg or cfg
    student.train()
    logs: dict[str, list[float]] = {"loss": [], "reverse_kl": [], "entropy": [], "grad_norm": []}
    for _ in range(steps):
        b = buffer.sample(cfg.batch_size, generator)
        s_logits = student.action_distribution(b.student_obs(device))
        loss, stats = vla_opd_loss(s_logits, b.teacher_logits.to(device), b.tokens.to(device),
                                   b.student_logprobs.to(device), lcfg)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite VLA-OPD loss ({lcfg.loss})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(trainable(student), cfg.grad_clip)
        optimizer.step()
        logs["loss"].append(float(loss.detach()))
        logs["grad_norm"].append(float(gn))
        for k, v in stats.items():
            logs[k].append(v)
    student.eval()
    return {k: float(np.mean(v)) if v else float("nan") for k, v in logs.items()}


def collect(runner, student, teacher, cfg: VLAOPDConfig, indices: Sequence[int], first_episode: int,
            count: int, seed_start: int, generator: torch.Generator, fraction: float
            ) -> tuple[list[Decisions], dict[str, float]]:
    """Episodes ``first_episode ...`` (+``count``) of the run: task ``indices[e % len]``, seed
    ``seed_start + e``, driver from :func:`driver_schedule`. Returns decision points and totals."""
    parts, succ, ents = [], [], []
    env_steps = queries = 0
    student.eval()  # the student acts as it is evaluated (no dropout); update() trains it
    for e in range(first_episode, first_episode + count):
        i = indices[e % len(indices)]
        driver = driver_schedule(e, fraction)
        venv = runner.make_vec_env(num_envs=1, task_index=i)
        try:
            d, st = rollout(venv, student, teacher, [seed_start + e], steps_limit(runner, i, cfg),
                            driver=driver, temperature=cfg.temperature,
                            teacher_temperature=cfg.teacher_temperature, generator=generator)
        finally:
            venv.close()
        if d is not None:
            parts.append(d)
        succ += st["success"]
        env_steps += st["env_steps"]
        queries += st["teacher_queries"]
        if driver == "student":
            ents.append(st["entropy"])
    return parts, {"rollout_success": float(np.mean(succ)), "env_steps": env_steps,
                   "teacher_queries": queries,
                   "rollout_entropy": float(np.mean(ents)) if ents else float("nan")}


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(student, cfg: VLAOPDConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable(student), lr=cfg.lr, weight_decay=cfg.weight_decay)


def warm_start(runner, student, teacher, cfg: VLAOPDConfig, indices: Sequence[int], seed_start: int,
               device: torch.device, generator: torch.Generator) -> dict[str, float]:
    """SFT on ``sft_episodes`` teacher-driven episodes: ``sft_updates`` hard-CE steps on their tokens."""
    parts, totals = collect(runner, student, teacher, cfg, indices, 0, cfg.sft_episodes, seed_start,
                            generator, fraction=0.0)
    buffer = ReplayBuffer(max(1, sum(len(p) for p in parts)))
    for p in parts:
        buffer.add(p)
    sft = dataclasses.replace(cfg, loss="hard_ce")
    logs = update(student, make_optimizer(student, cfg), buffer, cfg, cfg.sft_updates, generator, device,
                  loss_cfg=sft)
    return {"sft_teacher_queries": totals["teacher_queries"], "sft_env_steps": totals["env_steps"],
            "sft_decisions": len(buffer), "sft_teacher_success": totals["rollout_success"],
            "sft_final_loss": logs["loss"]}


def train_opd(runner, student, teacher, cfg: VLAOPDConfig, *, seed: int = 0,
              device: torch.device | str = "cpu", eval_seed_start: int = 100_000,
              state_dir: Path | None = None, log: Callable[[int, dict[str, float]], None] | None = None,
              tag: str = "vla_opd") -> dict[str, Any]:
    """The VLA-OPD loop (teacher frozen, student trained in place). Returns ``{"curve": [...],
    "warm_start": {...}, "train_tasks": [...], "held_out_tasks": [...]}``; each curve point has the
    cumulative ``teacher_queries`` and ``env_steps`` (warm start excluded), the greedy student's
    success on trained and held-out tasks, and the iteration's loss / KL / entropy.

    With ``state_dir`` the training state is saved atomically after every iteration and a run resumes
    from it (the replay buffer restarts empty).
    """
    device = torch.device(device)
    check_shared_action_space(student, teacher)
    teacher.eval().requires_grad_(False)
    if hasattr(student, "freeze_text_norm"):  # trained on cfg.train_tasks' instructions only
        student.freeze_text_norm()
    indices = task_indices(runner, cfg.train_tasks)
    held_out = [i for i in range(len(runner.specs)) if i not in indices] if cfg.eval_held_out else []
    seed_start = cfg.train_seed_start + 10_000 * seed
    if seed_start <= eval_seed_start + cfg.eval_episodes:
        raise ValueError("distill.train_seed_start must lie above the evaluation seeds")
    gen = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(student, cfg)
    buffer = ReplayBuffer(cfg.replay_capacity)
    it, curve, warm, totals = 0, [], {}, {"teacher_queries": 0, "env_steps": 0}
    resumed = load_train_state(state_dir) if state_dir is not None else None
    if resumed is not None:
        student.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        gen.set_state(resumed["extra_tensors"]["rng"])
        it, extra = resumed["step"], resumed["extra"]
        curve, warm, totals = extra["curve"], extra["warm_start"], extra["totals"]
        print(f"[{tag}] resuming at iteration {it}/{cfg.iterations} (replay buffer restarts empty)")
    elif cfg.sft_episodes > 0:
        t0 = time.perf_counter()
        sft_indices = range(len(runner.specs)) if cfg.sft_all_tasks else indices
        warm = warm_start(runner, student, teacher, cfg, sft_indices, seed_start + 5_000, device, gen)
        warm["wall_s"] = time.perf_counter() - t0
        print(f"[{tag}] warm start: {warm}")

    def evaluate(point: dict[str, float], ends: bool) -> None:
        ev = evaluate_tasks(student, runner, indices, cfg.eval_episodes, eval_seed_start, cfg)
        point["success_train"] = float(np.mean(list(ev.values())))
        point["per_task"] = dict(ev)
        if held_out and ends:
            ho = evaluate_tasks(student, runner, held_out, cfg.eval_episodes, eval_seed_start, cfg)
            point["success_held_out"] = float(np.mean(list(ho.values())))
            point["per_task"].update(ho)

    t_start = time.perf_counter()
    if not curve:
        point = {"iteration": 0, **totals, "wall_s": 0.0}
        if cfg.eval_at_start:
            evaluate(point, ends=True)
            print(f"[{tag}] start: success {point['success_train']:.2f} (train tasks)")
        curve.append(point)
    def budget_spent(totals: dict[str, int]) -> bool:
        return cfg.teacher_query_budget is not None and totals["teacher_queries"] >= cfg.teacher_query_budget

    while it < cfg.iterations and not budget_spent(totals):
        parts, st = collect(runner, student, teacher, cfg, indices, it * cfg.episodes_per_iter,
                            cfg.episodes_per_iter, seed_start, gen, cfg.student_fraction)
        for p in parts:
            buffer.add(p)
        totals = {"teacher_queries": totals["teacher_queries"] + st["teacher_queries"],
                  "env_steps": totals["env_steps"] + st["env_steps"]}
        steps = cfg.updates_per_iter if len(buffer) else 0
        logs = update(student, optimizer, buffer, cfg, steps, gen, device)
        it += 1
        point = {"iteration": it, **totals, "rollout_success": st["rollout_success"],
                 "rollout_entropy": st["rollout_entropy"], **{f"train_{k}": v for k, v in logs.items()},
                 "buffer": len(buffer), "wall_s": (curve[-1]["wall_s"] if curve else 0.0)
                 + time.perf_counter() - t_start}
        t_start = time.perf_counter()
        last = it == cfg.iterations or budget_spent(totals)
        if it % cfg.eval_every == 0 or last:
            evaluate(point, ends=last)
            point["wall_s"] += time.perf_counter() - t_start
            t_start = time.perf_counter()
        curve.append(point)
        if log is not None:
            log(it, {k: v for k, v in point.items() if isinstance(v, (int, float))})
        print(f"[{tag}] iter {it}/{cfg.iterations}: queries {totals['teacher_queries']}, env steps "
              f"{totals['env_steps']}, loss {logs['loss']:.4f}, KL(S||T) {logs['reverse_kl']:.4f}, entropy "
              f"{logs['entropy']:.3f}"
              + (f", success {point['success_train']:.2f}" if "success_train" in point else ""))
        if state_dir is not None:
            save_train_state(state_dir, it, student.state_dict(), optimizer,
                             extra_tensors={"rng": gen.get_state()},
                             extra={"curve": curve, "warm_start": warm, "totals": totals})
    return {"curve": curve, "warm_start": warm, "train_tasks": [runner.specs[i].name for i in indices],
            "held_out_tasks": [runner.specs[i].name for i in held_out]}


# ---------------------------------------------------------------------------- CLI entry
def run(cfg: DictConfig, run_dir: Path, runner, device: torch.device) -> dict[str, Any]:
    from embodied_distill.distill.rpd import load_teacher
    from embodied_distill.logging import MetricLogger
    from embodied_distill.policies.base import load_policy

    vcfg = VLAOPDConfig.from_cfg(cfg.distill)
    if not hasattr(runner, "specs"):
        raise ValueError("vla_opd needs the LIBERO-style runner (sim=libero task=<suite>)")
    # ---------------------------------------------------------------- 1. teacher (frozen)
    teacher = load_teacher(cfg.get("teacher"), device)
    if teacher is None or not hasattr(teacher, "action_distribution"):
        raise ValueError("vla_opd needs a VLA teacher with action_distribution(): "
                         "teacher=checkpoint teacher.path=<VLA checkpoint dir>")
    # ---------------------------------------------------------------- 2. student
    if vcfg.student_path:
        student = load_policy(vcfg.student_path, device=device)[0]
    else:
        student = build_student(teacher, vcfg.student_overrides, vcfg.student_init_from_teacher).to(device)
    check_shared_action_space(student, teacher)
    n_s = sum(p.numel() for p in student.parameters() if p.requires_grad)
    n_t = sum(p.numel() for p in teacher.parameters())
    print(f"[vla_opd] student {n_s} trainable params, teacher {n_t} params, loss {vcfg.loss}, "
          f"student_fraction {vcfg.student_fraction}")
    # ---------------------------------------------------------------- 3. train (resumable)
    logger = MetricLogger(run_dir)
    t0 = time.perf_counter()
    result = train_opd(runner, student, teacher, vcfg, seed=int(cfg.seed), device=device,
                       eval_seed_start=int(cfg.eval.seed_start),
                       state_dir=run_dir / "train_state" if cfg.resume else None,
                       log=lambda step, m: logger.log(step, {f"vla_opd/{k}": v for k, v in m.items()}))
    train_wall = time.perf_counter() - t0
    # ---------------------------------------------------------------- 4. checkpoint
    ckpt = student.save_pretrained(run_dir / "checkpoint",
                                   train_config=OmegaConf.to_container(cfg, resolve=True),
                                   meta={"method": "vla_opd", "iterations": vcfg.iterations,
                                         "teacher_queries": result["curve"][-1]["teacher_queries"]})
    print(f"[vla_opd] checkpoint written to {ckpt}")
    # ---------------------------------------------------------------- 5. evaluate
    student.to("cpu").eval()
    report = runner.evaluate(student, cfg.eval.episodes, cfg.eval.seed_start, num_envs=cfg.eval.num_envs,
                             video_path=run_dir / "eval.mp4" if cfg.eval.video_episodes > 0 else None,
                             video_episodes=cfg.eval.video_episodes)
    report.update(checkpoint=str(ckpt), train_wall_s=train_wall, method="vla_opd", **result)
    logger.log(vcfg.iterations, {"final/success_rate": report["success_rate"]})
    logger.close()
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=float))
    return report
