"""RL-100: imitation, OPE-gated offline RL inside the denoising chain, online RL, a 1-step head.

RL-100 (Lei et al., 2025; https://github.com/Lei-Kun/RL-100, ``unidpg/uni_ppo.py``). Reads top to bottom:

1. **Stage 1, imitation**: the diffusion policy trained by behaviour cloning on the demos (``bc.py``'s
   training phase), or an existing imitation checkpoint (``rl.stage1_checkpoint``).
2. **Stage 2, iterative offline RL** on a fixed dataset (the demos plus rollouts of the stage-1 policy):
   an IQL critic (twin Q, V fitted by expectile regression) and a learned chunk-level dynamics model
   are trained once; then each iteration updates the policy with the PPO clipped objective applied at
   **every denoising step** of the stochastic DDIM sampler (``sampler=ddim_eta``): the behaviour
   policy's chains are sampled at dataset states, each step's Gaussian log-probability enters the
   core's ``ppo_clip_loss`` with the chunk's IQL advantage ``Q(s, a) - V(s)``. An **Offline Policy
   Evaluation gate** rolls the candidate out in the dynamics model and scores it by Q; the candidate
   becomes the behaviour policy only if its estimate beats the best so far by ``gate_margin``.
   Every decision is logged (``metrics.jsonl``, ``rl100_state.json``).
3. **Stage 3, online RL**: fresh rollouts of the behaviour policy (chains and log-probs recorded),
   appended to the episode store; the critic is refreshed on all data; GAE advantages from V; the
   same per-step clipped objective; the same gate.
4. **Consistency head**: distilled from the final policy for 1-step control (``bc.py``'s phase).

The RL problem is chunk-level: a decision at step t executes ``n_action_steps`` actions; its reward is
the summed step reward, here the sparse success-at-episode-end reward (1 on the last step of an
episode that ends in success, else 0), which is exactly the evaluation metric; ``gamma`` is per chunk.
Progress is saved after every stage and iteration (atomic checkpoints + ``rl100_state.json``), so a
rerun resumes; ``rl.time_budget_s`` stops cleanly at the next safe point (rerun to continue).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from embodied_distill.data.episode_store import EpisodeStore
from embodied_distill.dataclass_config import dataclass_from_cfg
from embodied_distill.distill.bc import (
    build_student,
    demo_store_path,
    read_demos,
    sequence_dataset,
    student_ema_decay,
    train_phase,
)
from embodied_distill.logging import MetricLogger
from embodied_distill.losses import (
    compute_gae,
    expectile_loss,
    masked_mse,
    normalize_advantages,
    ppo_clip_loss,
    ppo_stats,
)
from embodied_distill.policies.base import load_policy


@dataclasses.dataclass
class RL100Config:
    """``distill.rl``: the RL stages (stage 1 and the consistency head use ``distill``'s BC fields)."""

    stage1_checkpoint: str | None = None
    """An imitation checkpoint of a diffusion policy to start from (None: train stage 1 on the demos)."""
    offline_from: str | None = None
    """Run dir of an earlier rl100 run from the same stage-1 policy: reuse its stage-1 rollouts, critic,
    dynamics model and stage-1 evaluation (e.g. for the injected-bad-update check)."""
    num_inference_steps: int = 10
    """Denoising steps K of the stochastic DDIM sampler the RL acts through."""
    eta: float = 1.0
    """DDIM eta of that sampler (> 0: stochastic)."""
    min_std: float = 0.05
    """Floor on each denoising step's std (normalised action units)."""
    gamma: float = 0.99
    """Discount per chunk decision."""
    expectile: float = 0.7
    """IQL expectile tau of V over the data's Q values."""
    hidden: int = 256
    """Width of the critic and dynamics MLPs (2 hidden layers)."""
    critic_lr: float = 3e-4
    """Adam learning rate of Q, V and the dynamics model."""
    critic_steps: int = 3000
    """Gradient steps of the IQL critic (and of the dynamics model) on the offline dataset."""
    online_critic_steps: int = 500
    """Critic steps on all data after each online collection."""
    critic_batch: int = 256
    """Minibatch of critic and dynamics training."""
    target_tau: float = 0.005
    """Polyak rate of the target Q networks."""
    rollout_episodes: int = 50
    """Stage-1 rollouts added to the offline dataset (successes and failures give the critic contrast)."""
    rollout_weight: float = 0.5
    """Share of critic batches, PPO states and OPE start states drawn from policy rollouts rather than
    demos (the demos outnumber the rollouts, and the rollouts hold the failures and the policy's states)."""
    rollout_seed_start: int = 50_000
    """Reset seeds of the stage-1 rollouts (online ones follow); must stay below eval.seed_start."""
    offline_iterations: int = 3
    """Gated offline policy-improvement iterations."""
    online_iterations: int = 1
    """Online iterations (0 skips stage 3)."""
    online_episodes: int = 20
    """Fresh episodes per online iteration."""
    ppo_rounds: int = 4
    """Rounds per offline iteration; each samples fresh chains from the current policy at dataset states."""
    ppo_states: int = 256
    """Dataset states per round."""
    ppo_epochs: int = 4
    """Passes over a round's chains."""
    ppo_minibatch: int = 64
    """Chains per gradient step."""
    policy_lr: float = 1e-5
    """Adam learning rate of the denoiser during RL."""
    clip: float = 0.2
    """PPO ratio clip, applied to every denoising step's ratio."""
    target_kl: float | None = 0.5
    """Stop a round's epochs once a minibatch's approx KL (old || new, per denoising step) exceeds 1.5 x
    this (None: never). Adam moves every weight by ~lr per step whatever the gradient, so without it a
    few epochs at lr 1e-4 moved the PickCube policy to 0 % success (approx KL 3.3). The per-step
    log-prob sums Ta x Da dimensions with std down to ``min_std``: one Adam step at lr 1e-5 already gives
    an approx KL of ~0.2 per denoising step (PickCube, 64 chains)."""
    bc_coef: float = 0.0
    """Weight of the optional BC (denoising) loss on demo batches during RL (RL-100's BC term)."""
    gae_lambda: float = 0.95
    """GAE lambda of the online stage."""
    advantage_sign: float = 1.0
    """-1 injects a bad update (sign-flipped advantages), to test the gate."""
    gate_enabled: bool = True
    """False accepts every candidate (its gate verdict is still computed and logged)."""
    gate_margin: float = 0.002
    """A candidate is accepted when OPE(candidate) > best OPE so far + margin (Q units ~ success prob.)."""
    ope_states: int = 512
    """Dataset states the OPE starts from (fixed across candidates, as is the sampling noise)."""
    ope_horizon: int = 1
    """Chunk steps rolled out in the dynamics model before scoring by Q (0: Q at the start states)."""
    ope_penalty: float = 1.0
    """Pessimism of the OPE: minus this x the dynamics ensemble's disagreement at each rolled-out step
    (MOPO-style; actions far from the data make the members disagree)."""
    dynamics_members: int = 3
    """Ensemble size of the dynamics model (mean prediction)."""
    ope_holdout: float = 0.0
    """Fraction of the offline episodes (demos and rollouts alike, chosen by seed) held out from the
    critic that drives the updates; a second critic and dynamics model fitted on them alone score the
    candidates in the gate. 0: one critic does both, as in RL-100 -- the update then maximises the very Q
    the gate reads, so an offline candidate's estimate rises almost by construction."""
    time_budget_s: float = 0.0
    """Stop cleanly at the next safe point after this many seconds (0: no limit); rerun to resume."""

    def __post_init__(self):
        if self.eta <= 0 or self.min_std <= 0:
            raise ValueError("eta and min_std must be > 0 (the RL needs a stochastic sampler)")
        if not 0 < self.gamma <= 1 or not 0 < self.expectile < 1 or not 0 <= self.gae_lambda <= 1:
            raise ValueError("need 0 < gamma <= 1, 0 < expectile < 1, 0 <= gae_lambda <= 1")
        if min(self.critic_steps, self.critic_batch, self.ppo_states, self.ppo_epochs, self.ppo_minibatch,
               self.ope_states, self.dynamics_members, self.num_inference_steps) < 1:
            raise ValueError("step counts, batch sizes and ensemble size must be >= 1")
        if min(self.offline_iterations, self.online_iterations, self.rollout_episodes, self.ope_horizon,
               self.online_critic_steps, self.online_episodes) < 0:
            raise ValueError("iteration and episode counts must be >= 0")
        if self.offline_from and self.online_iterations:
            raise ValueError("rl.offline_from reuses another run's data read-only: set online_iterations=0")
        if self.advantage_sign not in (1.0, -1.0):
            raise ValueError("advantage_sign must be 1 or -1")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError("target_kl must be > 0 (or null)")
        if self.ope_penalty < 0:
            raise ValueError("ope_penalty must be >= 0")
        if not 0 <= self.ope_holdout < 1:
            raise ValueError("ope_holdout must lie in [0, 1)")
        if not 0 <= self.rollout_weight <= 1:
            raise ValueError("rollout_weight must lie in [0, 1]")
        if self.clip <= 0 or self.policy_lr <= 0 or self.critic_lr <= 0 or self.bc_coef < 0:
            raise ValueError("clip and learning rates must be > 0, bc_coef >= 0")

    @classmethod
    def from_cfg(cls, values: DictConfig | dict | None) -> RL100Config:
        return dataclass_from_cfg(cls, values, "distill.rl")


# ---------------------------------------------------------------------------- chunk-level data
@dataclasses.dataclass
class Transitions:
    """Chunk-level transitions in normalised units: obs/next_obs ``(N, To*Do)``, action ``(N, n*Da)``
    (the executed part of the chunk), reward ``(N,)``, done ``(N,)`` (1: the episode ended)."""

    obs: Tensor
    action: Tensor
    reward: Tensor
    next_obs: Tensor
    done: Tensor

    def __len__(self) -> int:
        return len(self.obs)

    def batch(self, idx: Tensor) -> Transitions:
        return Transitions(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))

    @staticmethod
    def cat(parts: list[Transitions]) -> Transitions:
        return Transitions(*(torch.cat([getattr(p, f.name) for p in parts])
                             for f in dataclasses.fields(Transitions)))


def build_transitions(state: np.ndarray, action: np.ndarray, reward: np.ndarray, ends: np.ndarray,
                      policy, stride: int = 1) -> Transitions:
    """Episodes ``state (N, Do)``, ``action (N, Da)``, ``reward (N,)`` (data units, concatenated, ``ends``
    exclusive) -> a transition at every ``stride``-th step: obs window ``t-To+1..t`` (first step
    repeated), the executed chunk ``t..t+n-1`` (last action repeated past the end), summed reward,
    the window ending at ``t+n``; ``done`` when ``t+n`` reaches the episode end."""
    To, n = policy.config.obs_horizon, policy.config.n_action_steps
    s = policy.normalizer.normalize("state", torch.as_tensor(state, dtype=torch.float32))
    a = policy.normalizer.normalize("action", torch.as_tensor(action, dtype=torch.float32)).clamp(-1, 1)
    r = torch.as_tensor(reward, dtype=torch.float32)
    obs, act, rew, nxt, done = [], [], [], [], []
    start = 0
    for end in np.asarray(ends, dtype=np.int64):
        t = torch.arange(start, end, stride)
        window = torch.arange(-To + 1, 1)
        obs.append(s[(t[:, None] + window).clamp(min=start)].flatten(1))
        act.append(a[(t[:, None] + torch.arange(n)).clamp(max=end - 1)].flatten(1))
        steps = t[:, None] + torch.arange(n)
        rew.append(torch.where(steps < end, r[steps.clamp(max=end - 1)], 0.0).sum(1))
        t_next = (t + n).clamp(max=end - 1)
        nxt.append(s[(t_next[:, None] + window).clamp(min=start)].flatten(1))
        done.append((t + n >= end).float())
        start = int(end)
    return Transitions(torch.cat(obs), torch.cat(act), torch.cat(rew), torch.cat(nxt), torch.cat(done))


def episode_index(ends: np.ndarray, stride: int = 1) -> Tensor:
    """``(N,)`` the episode of each transition :func:`build_transitions` makes from the same ``ends``."""
    starts = np.concatenate([[0], np.asarray(ends, dtype=np.int64)[:-1]])
    parts = [torch.full((len(range(int(a), int(b), stride)),), e, dtype=torch.long)
             for e, (a, b) in enumerate(zip(starts, ends))]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def holdout_episodes(n_episodes: int, fraction: float, seed: int) -> Tensor:
    """``(n_episodes,)`` bool: the episodes held out for evaluation, ``round(fraction * n)`` of them (at
    least one when ``fraction > 0``), chosen by ``seed``."""
    held = torch.zeros(n_episodes, dtype=torch.bool)
    k = min(n_episodes - 1, max(1, round(fraction * n_episodes))) if fraction > 0 else 0
    if k > 0:
        held[torch.randperm(n_episodes, generator=torch.Generator().manual_seed(seed))[:k]] = True
    return held


def sparse_success_reward(ends: np.ndarray, success: np.ndarray) -> np.ndarray:
    """``(N,)`` per-step reward: ``success[e]`` on the last step of episode e, 0 elsewhere."""
    reward = np.zeros(int(ends[-1]) if len(ends) else 0, np.float32)
    reward[np.asarray(ends, dtype=np.int64) - 1] = np.asarray(success, dtype=np.float32)
    return reward


# ---------------------------------------------------------------------------- critic, dynamics, gate
def mlp(inp: int, out: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


class IQLCritic(nn.Module):
    """Twin ``Q(s, a)`` (+ Polyak targets) and ``V(s)`` on flat normalised obs and executed chunks."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.q1, self.q2 = mlp(obs_dim + act_dim, 1, hidden), mlp(obs_dim + act_dim, 1, hidden)
        self.v = mlp(obs_dim, 1, hidden)
        self.q1_target, self.q2_target = copy.deepcopy(self.q1), copy.deepcopy(self.q2)
        for p in [*self.q1_target.parameters(), *self.q2_target.parameters()]:
            p.requires_grad_(False)

    def q(self, obs: Tensor, action: Tensor, target: bool = False) -> Tensor:
        """``(B, Do'), (B, Da') -> (B,)`` min of the twin (target) Q networks."""
        x = torch.cat([obs, action], -1)
        q1, q2 = (self.q1_target, self.q2_target) if target else (self.q1, self.q2)
        return torch.minimum(q1(x), q2(x)).squeeze(-1)

    def value(self, obs: Tensor) -> Tensor:
        return self.v(obs).squeeze(-1)

    def advantage(self, obs: Tensor, action: Tensor) -> Tensor:
        """``A = Q_target(s, a) - V(s)``, ``(B,)``, no gradient."""
        with torch.no_grad():
            return self.q(obs, action, target=True) - self.value(obs)

    def loss(self, b: Transitions, gamma: float, expectile: float) -> tuple[Tensor, dict[str, float]]:
        """IQL: V to the tau-expectile of Q_target(s, a); both Q to ``r + gamma (1 - done) V(s')``."""
        with torch.no_grad():
            q_t = self.q(b.obs, b.action, target=True)
            target = b.reward + gamma * (1 - b.done) * self.value(b.next_obs)
        v_loss = expectile_loss(q_t - self.value(b.obs), expectile=expectile)
        x = torch.cat([b.obs, b.action], -1)
        q_loss = masked_mse(self.q1(x).squeeze(-1), target) + masked_mse(self.q2(x).squeeze(-1), target)
        return v_loss + q_loss, {"v_loss": float(v_loss.detach()), "q_loss": float(q_loss.detach())}

    def update_targets(self, tau: float) -> None:
        from embodied_distill.losses import ema_update

        ema_update(self.q1_target.parameters(), self.q1.parameters(), 1 - tau)
        ema_update(self.q2_target.parameters(), self.q2.parameters(), 1 - tau)


class DynamicsModel(nn.Module):
    """Ensemble MLP ``(s, a) -> (s' - s, r)`` at the chunk level; ``step`` returns the members' mean."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, members: int = 3):
        super().__init__()
        self.members = nn.ModuleList(mlp(obs_dim + act_dim, obs_dim + 1, hidden) for _ in range(members))

    def forward(self, obs: Tensor, action: Tensor) -> Tensor:
        x = torch.cat([obs, action], -1)
        return torch.stack([m(x) for m in self.members])  # (M, B, Do' + 1)

    def step(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, Do'), (B, Da') -> (next obs (B, Do'), reward (B,), disagreement (B,))``; the disagreement
        is the norm of the members' standard deviation of the predicted next obs (0 for one member)."""
        out = self(obs, action)
        spread = out[:, :, :-1].std(0, unbiased=False).norm(dim=-1)
        mean = out.mean(0)
        return obs + mean[:, :-1], mean[:, -1], spread

    def loss(self, b: Transitions, gamma: float = 0.0, expectile: float = 0.0
             ) -> tuple[Tensor, dict[str, float]]:
        out = self(b.obs, b.action)
        live = (1 - b.done)[None, :, None].expand(out.shape[0], -1, out.shape[-1] - 1)
        obs_loss = masked_mse(out[..., :-1], (b.next_obs - b.obs).expand_as(out[..., :-1]), live)
        rew_loss = masked_mse(out[..., -1], b.reward.expand_as(out[..., -1]))
        metrics = {"obs_loss": float(obs_loss.detach()), "reward_loss": float(rew_loss.detach())}
        return obs_loss + rew_loss, metrics


def mixture_weights(n_demo: int, n_rollout: int, rollout_weight: float) -> Tensor:
    """Sampling weights ``(n_demo + n_rollout,)``: demos share ``1 - rollout_weight``, rollouts the rest."""
    if n_rollout == 0 or n_demo == 0:
        return torch.ones(n_demo + n_rollout)
    return torch.cat([torch.full((n_demo,), (1 - rollout_weight) / n_demo),
                      torch.full((n_rollout,), rollout_weight / n_rollout)])


def fit(model: nn.Module, data: Transitions, steps: int, rcfg: RL100Config, gen: torch.Generator,
        after_step=None, weights: Tensor | None = None) -> dict[str, float]:
    """Adam on ``model.loss(batch, gamma, expectile)`` over minibatches of ``data`` (drawn uniformly, or
    with replacement by ``weights (N,)``)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=rcfg.critic_lr)
    metrics: dict[str, float] = {}
    for _ in range(steps):
        idx = torch.randint(len(data), (rcfg.critic_batch,), generator=gen) if weights is None else \
            torch.multinomial(weights, rcfg.critic_batch, replacement=True, generator=gen)
        batch = data.batch(idx)
        loss, metrics = model.loss(batch, rcfg.gamma, rcfg.expectile)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
    return metrics


@torch.no_grad()
def ope_estimate(act, start_obs: Tensor, critic: IQLCritic, dynamics: DynamicsModel, horizon: int,
                 gamma: float, penalty: float = 0.0) -> float:
    """Model-based OPE (RL-100): ``mean[sum_h gamma^h (r_h - penalty u_h) + gamma^H Q(s_H, pi(s_H))]``
    from ``start_obs``, with ``u_h`` the dynamics ensemble's disagreement at step h.

    ``act``: ``(B, Do') -> (B, Da')`` normalised executed chunks of the policy being evaluated (pass
    one with fixed sampling noise so candidates are compared on common random numbers).
    """
    obs, total = start_obs, torch.zeros(len(start_obs))
    for h in range(horizon):
        obs, reward, disagreement = dynamics.step(obs, act(obs))
        total += gamma**h * (reward - penalty * disagreement)
    total += gamma**horizon * critic.q(obs, act(obs))
    return float(total.mean())


@dataclasses.dataclass
class OPEGate:
    """Accept a candidate only if its OPE estimate beats the best so far by ``margin``."""

    margin: float = 0.005
    enabled: bool = True
    best: float | None = None

    def decide(self, estimate: float) -> tuple[bool, bool]:
        """Returns ``(verdict, accepted)``: the gate's verdict, and whether the candidate is accepted
        (the verdict, or always when the gate is disabled). The best estimate follows acceptances."""
        verdict = self.best is None or estimate > self.best + self.margin
        accepted = verdict or not self.enabled
        if accepted:
            self.best = estimate
        return verdict, accepted


# ---------------------------------------------------------------------------- the policy's chain
def executed_chunk(policy, chain: Tensor) -> Tensor:
    """``(B, K+1, Ta, Da)`` chain -> ``(B, n*Da)`` the normalised actions the robot executes."""
    return chain[:, -1, : policy.config.n_action_steps].clamp(-1, 1).flatten(1)


def chunk_actor(policy, seed: int):
    """``(B, To*Do) -> (B, n*Da)`` sampling with the stochastic sampler from a fixed noise seed."""
    def act(obs: Tensor) -> Tensor:
        policy.sampler.generator = torch.Generator().manual_seed(seed)
        cond = policy.global_cond(obs.view(len(obs), policy.config.obs_horizon, -1))
        return executed_chunk(policy, policy.sampler.sample_chain(cond)[0])
    return act


def ppo_update(policy, optimizer, cond: Tensor, chain: Tensor, old_log_prob: Tensor, advantage: Tensor,
               rcfg: RL100Config, gen: torch.Generator, bc_batches=None) -> dict[str, float]:
    """The clipped objective at every denoising step: ``ppo_clip_loss`` on ``(M, K)`` per-step log-probs
    with the chunk's advantage broadcast over its K steps (+ ``bc_coef`` x denoising loss)."""
    adv = rcfg.advantage_sign * normalize_advantages(advantage)
    stats: dict[str, list[float]] = {"loss": [], "approx_kl": [], "clip_fraction": []}
    for _ in range(rcfg.ppo_epochs):
        for idx in torch.randperm(len(cond), generator=gen).split(rcfg.ppo_minibatch):
            new_log_prob = policy.sampler.chain_log_probs(chain[idx], cond[idx])
            a = adv[idx, None].expand_as(new_log_prob)
            loss = ppo_clip_loss(new_log_prob, old_log_prob[idx], a, clip=rcfg.clip)
            if rcfg.bc_coef > 0 and bc_batches is not None:
                loss = loss + rcfg.bc_coef * policy.compute_loss(next(bc_batches))[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.unet.parameters(), 1.0)
            optimizer.step()
            st = ppo_stats(new_log_prob, old_log_prob[idx], clip=rcfg.clip)
            stats["loss"].append(float(loss.detach()))
            stats["approx_kl"].append(float(st["approx_kl"]))
            stats["clip_fraction"].append(float(st["clip_fraction"]))
            if rcfg.target_kl is not None and stats["approx_kl"][-1] > 1.5 * rcfg.target_kl:
                return {**{k: float(np.mean(v)) for k, v in stats.items()}, "early_stop": 1.0,
                        "gradient_steps": float(len(stats["loss"]))}
    return {**{k: float(np.mean(v)) for k, v in stats.items()}, "early_stop": 0.0,
            "gradient_steps": float(len(stats["loss"]))}


# ---------------------------------------------------------------------------- rollouts
@torch.no_grad()
def collect_rollouts(policy, runner, seeds: list[int], num_envs: int = 2) -> list[dict[str, Any]]:
    """Roll the stochastic sampler out on ``seeds``; per episode: step ``state (T, Do)``, ``action
    (T, Da)``, ``success`` (at the end) and per-decision ``cond (D, Dg)``, ``chain (D, K+1, Ta, Da)``,
    ``log_prob (D, K)``, ``reward (D,)`` (sparse: the success on the decision holding the last step)."""
    cfg = policy.config
    n, T = cfg.n_action_steps, runner.max_episode_steps
    seeds = list(seeds)
    episodes: list[dict[str, Any]] = []
    venv = runner.make_vec_env(num_envs=min(num_envs, len(seeds)))
    try:
        N = venv.num_envs
        for w in range(0, len(seeds), N):
            wave = (seeds[w:w + N] + [seeds[-1] + 1 + i for i in range(N)])[:N]  # pad the last wave
            obs = venv.reset(wave)
            policy.sampler.generator = torch.Generator().manual_seed(int(wave[0]))
            hist = deque([obs] * cfg.obs_horizon, maxlen=cfg.obs_horizon)
            states, actions, conds, chains, log_probs = [], [], [], [], []
            for t in range(T):
                hist.append(obs)
                if t % n == 0:
                    stacked = {"state": torch.as_tensor(np.stack(hist, 1))}
                    cond = policy.global_cond(policy.stack_obs(stacked))
                    chain, log_prob = policy.sampler.sample_chain(cond)
                    chunk = policy.normalizer.unnormalize("action", chain[:, -1, :n].clamp(-1, 1))
                    conds.append(cond), chains.append(chain), log_probs.append(log_prob)
                action = chunk[:, t % n].numpy()
                states.append(obs), actions.append(action)
                obs, _, success = venv.step(action)
            for i in range(min(N, len(seeds) - w)):
                reward = np.zeros(len(conds), np.float32)
                reward[-1] = float(success[i])
                episodes.append({"seed": wave[i], "success": bool(success[i]),
                                 "state": np.stack([s[i] for s in states]),
                                 "action": np.stack([a[i] for a in actions]).astype(np.float32),
                                 "cond": torch.stack([c[i] for c in conds]),
                                 "chain": torch.stack([c[i] for c in chains]),
                                 "log_prob": torch.stack([lp[i] for lp in log_probs]), "reward": reward})
    finally:
        venv.close()
    return episodes


def append_episodes(store: EpisodeStore, episodes: list[dict[str, Any]], stage: int) -> None:
    for ep in episodes:
        T = len(ep["action"])
        reward = np.zeros(T, np.float32)
        reward[-1] = float(ep["success"])
        store.add_episode({"state": ep["state"], "action": ep["action"], "reward": reward},
                          meta={"seed": ep["seed"], "success": ep["success"], "stage": stage})


def store_transitions(store: EpisodeStore, policy, start: int = 0, stop: int | None = None) -> Transitions:
    """Transitions of episodes ``start:stop`` of an RL episode store (keys state, action, reward)."""
    all_ends = store.episode_ends
    lo = int(all_ends[start - 1]) if start > 0 else 0
    ends = all_ends[start:stop]
    data = {k: v[lo: ends[-1]] for k, v in store.load(["state", "action", "reward"]).items()}
    return build_transitions(data["state"], data["action"], data["reward"], ends - lo, policy)


# ---------------------------------------------------------------------------- bookkeeping
class Progress:
    """``rl100_state.json``: finished stages, gate decisions, evaluations; written atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else \
            {"done": [], "decisions": [], "evals": {}, "behaviour": None, "best_estimate": None}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)

    def done(self, key: str) -> bool:
        return key in self.data["done"]

    def mark(self, key: str) -> None:
        self.data["done"].append(key)
        self.save()


def save_module(module: nn.Module, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def evaluate(runner, policy, cfg: DictConfig, name: str, progress: Progress, logger: MetricLogger,
             step: int) -> dict[str, Any]:
    """Success of ``policy`` (its current sampler) on the unseen evaluation seeds; recorded under ``name``."""
    policy.reset()
    report = runner.evaluate(policy, cfg.eval.episodes, cfg.eval.seed_start, num_envs=cfg.eval.num_envs,
                             video_path=None)
    summary = {k: v for k, v in report.items() if k not in ("per_episode", "seeds")}
    progress.data["evals"][name] = summary
    progress.save()
    logger.log(step, {f"eval/{name}/success_rate": summary["success_rate"]})
    print(f"[rl100] eval {name}: success {summary['success_rate']:.3f} over {summary['episodes']} episodes")
    return report


@torch.no_grad()
def chunk_latency_ms(policy, obs_dim: int, reps: int = 30) -> float:
    """Median wall time of one action chunk at batch 1 with the policy's current sampler (ms)."""
    cond = torch.zeros(1, policy.config.obs_horizon * obs_dim)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        policy.sampler(cond)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


class OutOfTime(Exception):
    """The time budget is used up (progress is saved; rerun to resume)."""


class Finished(Exception):  # noqa: N818
    """Every stage asked for is done."""


# ---------------------------------------------------------------------------- the pipeline
def run(cfg: DictConfig, run_dir: Path, runner, device: torch.device) -> dict[str, Any]:
    rcfg = RL100Config.from_cfg(cfg.distill.get("rl"))
    if cfg.student.name != "diffusion" and rcfg.stage1_checkpoint is None:
        raise ValueError(f"distill=rl100 needs student=diffusion (got student={cfg.student.name})")
    if rcfg.rollout_seed_start + rcfg.rollout_episodes + rcfg.online_iterations * rcfg.online_episodes \
            > cfg.eval.seed_start:
        raise ValueError("rollout seeds would reach eval.seed_start: lower rl.rollout_seed_start")
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    progress = Progress(run_dir / "rl100_state.json")
    logger = MetricLogger(run_dir)
    gen = torch.Generator().manual_seed(int(cfg.seed))

    def check_time() -> None:
        if rcfg.time_budget_s and time.time() - t_start > rcfg.time_budget_s:
            raise OutOfTime

    # ---------------------------------------------------------------- 1. demos + imitation (stage 1)
    store_path = demo_store_path(cfg)
    runner.collect_demos(store_path, cfg.demos.n_episodes, seed_start=cfg.demos.seed_start,
                         num_workers=cfg.demos.num_workers, noise_std=cfg.demos.noise_std,
                         noise_prob=cfg.demos.noise_prob)
    demos, demo_ends, _ = read_demos(cfg, store_path)
    if rcfg.stage1_checkpoint:
        policy = load_policy(rcfg.stage1_checkpoint, device)[0]
        if policy.name != "diffusion":
            raise ValueError(f"rl.stage1_checkpoint must hold a diffusion policy, not {policy.name!r}")
    else:
        policy = build_student(cfg, demos, device)
    dataset = sequence_dataset(policy, demos, demo_ends)
    if not rcfg.stage1_checkpoint and not progress.done("stage1"):
        train_phase("bc", policy, policy.compute_loss, cfg.distill.steps, cfg, dataset, gen,
                    run_dir / "train_state", logger, device, ema_decay=student_ema_decay(cfg, policy))
    policy.set_sampler("ddim_eta", num_inference_steps=rcfg.num_inference_steps, eta=rcfg.eta,
                       min_std=rcfg.min_std)
    train_cfg = OmegaConf.to_container(cfg, resolve=True)
    policies_dir = run_dir / "policies"
    if not progress.done("stage1"):
        policy.save_pretrained(policies_dir / "stage1", train_config=train_cfg, meta={"stage": "stage1"})
        progress.data["behaviour"] = str(policies_dir / "stage1")
        progress.mark("stage1")
    policy = load_policy(progress.data["behaviour"], device)[0]  # resume: the current behaviour policy
    policy.set_sampler("ddim_eta", num_inference_steps=rcfg.num_inference_steps, eta=rcfg.eta,
                       min_std=rcfg.min_std)
    step = 0
    if rcfg.offline_from and "stage1" not in progress.data["evals"]:  # same checkpoint, same seeds
        progress.data["evals"]["stage1"] = Progress(Path(rcfg.offline_from) / "rl100_state.json"
                                                    ).data["evals"]["stage1"]
        progress.save()
    try:
        if "stage1" not in progress.data["evals"]:
            evaluate(runner, policy, cfg, "stage1", progress, logger, step)
        check_time()

        # ------------------------------------------------------------ 2. offline dataset, critic, dynamics
        source = Path(rcfg.offline_from) if rcfg.offline_from else run_dir
        rl_store = EpisodeStore(source / "rl_data.zarr", mode="r" if rcfg.offline_from else "a")
        if rl_store.n_episodes < rcfg.rollout_episodes:  # stage-1 rollouts (resumes by seed)
            have = rl_store.n_episodes
            seeds = range(rcfg.rollout_seed_start + have, rcfg.rollout_seed_start + rcfg.rollout_episodes)
            stage1 = load_policy(policies_dir / "stage1", device)[0]
            stage1.set_sampler("ddim_eta", num_inference_steps=rcfg.num_inference_steps, eta=rcfg.eta,
                               min_std=rcfg.min_std)
            for i in range(0, len(seeds), 10):
                append_episodes(rl_store, collect_rollouts(stage1, runner, list(seeds[i:i + 10]),
                                                           cfg.eval.num_envs), stage=0)
                check_time()
        demo_reward = sparse_success_reward(demo_ends, np.ones(len(demo_ends)))
        demo_tr = build_transitions(demos["state"], demos["action"], demo_reward, demo_ends, policy)
        rollout_tr = store_transitions(rl_store, policy, 0, rcfg.rollout_episodes)
        held_demo = holdout_episodes(len(demo_ends), rcfg.ope_holdout, int(cfg.seed) + 3)[
            episode_index(demo_ends)]
        held_rollout = holdout_episodes(rcfg.rollout_episodes, rcfg.ope_holdout, int(cfg.seed) + 4)[
            episode_index(rl_store.episode_ends[:rcfg.rollout_episodes])]
        demo_eval, rollout_eval = demo_tr.batch(held_demo), rollout_tr.batch(held_rollout)
        demo_tr, rollout_tr = demo_tr.batch(~held_demo), rollout_tr.batch(~held_rollout)
        offline = Transitions.cat([demo_tr, rollout_tr])
        weights = mixture_weights(len(demo_tr), len(rollout_tr), rcfg.rollout_weight)
        obs_dim, act_dim = offline.obs.shape[1], offline.action.shape[1]
        # the critic and dynamics model of the updates; the gate's pair is fitted on the held-out episodes
        models = {"": (IQLCritic(obs_dim, act_dim, rcfg.hidden),
                       DynamicsModel(obs_dim, act_dim, rcfg.hidden, rcfg.dynamics_members), offline, weights)}
        if rcfg.ope_holdout > 0:
            held = Transitions.cat([demo_eval, rollout_eval])
            models["_eval"] = (IQLCritic(obs_dim, act_dim, rcfg.hidden),
                               DynamicsModel(obs_dim, act_dim, rcfg.hidden, rcfg.dynamics_members), held,
                               mixture_weights(len(demo_eval), len(rollout_eval), rcfg.rollout_weight))
        fitted = progress.done("critic") or bool(rcfg.offline_from)
        for suffix, (c, dyn, data, w) in models.items():
            if fitted:
                c.load_state_dict(load_file(str(source / f"critic{suffix}.safetensors")))
                dyn.load_state_dict(load_file(str(source / f"dynamics{suffix}.safetensors")))
                continue
            m = fit(c, data, rcfg.critic_steps, rcfg, gen, weights=w,
                    after_step=lambda c=c: c.update_targets(rcfg.target_tau))
            m.update(fit(dyn, data, rcfg.critic_steps, rcfg, gen, weights=w))
            logger.log(step, {f"critic{suffix}/{k}": v for k, v in m.items()})
            save_module(c, run_dir / f"critic{suffix}.safetensors")
            save_module(dyn, run_dir / f"dynamics{suffix}.safetensors")
        if not fitted:
            progress.mark("critic")
        critic, dynamics = models[""][:2]
        ope_critic, ope_dynamics, ope_data, ope_weights = models["_eval" if rcfg.ope_holdout > 0 else ""]
        ope_gen = torch.Generator().manual_seed(int(cfg.seed) + 1)
        ope_obs = ope_data.obs[torch.multinomial(ope_weights, rcfg.ope_states, generator=ope_gen)]
        gate = OPEGate(rcfg.gate_margin, rcfg.gate_enabled)

        def ope(p) -> float:
            return ope_estimate(chunk_actor(p, int(cfg.seed) + 2), ope_obs, ope_critic, ope_dynamics,
                                rcfg.ope_horizon, rcfg.gamma, rcfg.ope_penalty)

        gate.best = progress.data["best_estimate"]
        if gate.best is None:
            gate.best = progress.data["best_estimate"] = ope(policy)
            progress.save()
        bc_batches = iter(lambda: {k: v.to(device) for k, v in dataset.get_batch(
            torch.randint(len(dataset), (rcfg.ppo_minibatch,), generator=gen)).items()}, None)

        def gated(name: str, candidate, stats: dict[str, float]) -> None:
            """OPE the candidate, decide, log, and make it the behaviour policy if accepted."""
            nonlocal policy
            estimate = ope(candidate)
            best_before = gate.best
            verdict, accepted = gate.decide(estimate)
            record = {"iteration": name, "estimate": estimate, "best_before": best_before,
                      "margin": rcfg.gate_margin, "gate_verdict": verdict, "gate_enabled": rcfg.gate_enabled,
                      "accepted": accepted, "advantage_sign": rcfg.advantage_sign, **stats}
            logger.log(len(progress.data["decisions"]), {
                "gate/estimate": estimate, "gate/best_before": float(best_before),
                "gate/verdict": float(verdict), "gate/accepted": float(accepted)})
            print(f"[rl100] gate {name}: OPE {estimate:.4f} vs best {best_before:.4f} "
                  f"(+{rcfg.gate_margin}) -> {'ACCEPT' if accepted else 'REJECT'}"
                  f"{'' if verdict == accepted else ' (gate disabled; verdict reject)'}")
            if accepted:
                candidate.save_pretrained(policies_dir / name, train_config=train_cfg,
                                          meta={"stage": name, "ope_estimate": estimate})
                progress.data["behaviour"] = str(policies_dir / name)
                progress.data["best_estimate"] = gate.best
                policy = candidate
            else:  # back to the behaviour policy
                policy = load_policy(progress.data["behaviour"], device)[0]
                policy.set_sampler("ddim_eta", num_inference_steps=rcfg.num_inference_steps, eta=rcfg.eta,
                                   min_std=rcfg.min_std)
            progress.data["decisions"].append(record)
            progress.mark(name)
            if accepted:
                evaluate(runner, policy, cfg, name, progress, logger, len(progress.data["decisions"]))

        # ------------------------------------------------------------ 2b. gated offline iterations
        for it in range(rcfg.offline_iterations):
            name = f"offline_{it}"
            if progress.done(name):
                continue
            candidate = copy.deepcopy(policy)
            optimizer = torch.optim.Adam(candidate.unet.parameters(), lr=rcfg.policy_lr)
            stats = {}
            for _ in range(rcfg.ppo_rounds):
                idx = torch.multinomial(weights, rcfg.ppo_states, generator=gen)
                obs = offline.obs[idx]
                cond = candidate.global_cond(obs.view(len(obs), candidate.config.obs_horizon, -1))
                chain, old_log_prob = candidate.sampler.sample_chain(cond)
                advantage = critic.advantage(obs, executed_chunk(candidate, chain))
                stats = ppo_update(candidate, optimizer, cond, chain, old_log_prob, advantage, rcfg, gen,
                                   bc_batches)
            gated(name, candidate, stats)
            check_time()

        # ------------------------------------------------------------ 3. online iterations
        if (run_dir / "critic_online.safetensors").exists():  # resume: the critic as the online stage left it
            critic.load_state_dict(load_file(str(run_dir / "critic_online.safetensors")))
        for it in range(rcfg.online_iterations):
            name = f"online_{it}"
            if progress.done(name):
                continue
            first = rcfg.rollout_seed_start + rcfg.rollout_episodes + it * rcfg.online_episodes
            episodes = collect_rollouts(policy, runner, list(range(first, first + rcfg.online_episodes)),
                                        cfg.eval.num_envs)
            if rl_store.n_episodes < first + rcfg.online_episodes - rcfg.rollout_seed_start:  # not on a rerun
                append_episodes(rl_store, episodes, stage=1 + it)  # the episode store grows with fresh data
            fresh = store_transitions(rl_store, policy, rcfg.rollout_episodes)
            rollouts = Transitions.cat([rollout_tr, fresh])
            m = fit(critic, Transitions.cat([demo_tr, rollouts]), rcfg.online_critic_steps, rcfg, gen,
                    after_step=lambda: critic.update_targets(rcfg.target_tau),
                    weights=mixture_weights(len(demo_tr), len(rollouts), rcfg.rollout_weight))
            logger.log(step, {f"critic/online_{k}": v for k, v in m.items()})
            gate.best = ope(policy)  # the critic changed: re-score the behaviour policy
            cond = torch.stack([e["cond"] for e in episodes], 1)  # (D, E, Dg) time-major
            with torch.no_grad():
                values = critic.value(cond.flatten(0, 1)).view(cond.shape[:2])
            rewards = torch.as_tensor(np.stack([e["reward"] for e in episodes], 1))
            dones = torch.zeros_like(rewards)
            dones[-1] = 1.0
            advantage, _ = compute_gae(rewards, values, dones, torch.zeros(len(episodes)),
                                       gamma=rcfg.gamma, lam=rcfg.gae_lambda)
            candidate = copy.deepcopy(policy)
            optimizer = torch.optim.Adam(candidate.unet.parameters(), lr=rcfg.policy_lr)
            chains = torch.stack([e["chain"] for e in episodes], 1).flatten(0, 1)
            old = torch.stack([e["log_prob"] for e in episodes], 1).flatten(0, 1)
            stats = ppo_update(candidate, optimizer, cond.flatten(0, 1), chains, old, advantage.flatten(),
                               rcfg, gen, bc_batches)
            stats["rollout_success"] = float(np.mean([e["success"] for e in episodes]))
            save_module(critic, run_dir / "critic_online.safetensors")  # critic.safetensors stays offline
            gated(name, candidate, stats)
            check_time()

        # ------------------------------------------------------------ 4. consistency head (1-step)
        if cfg.distill.consistency_steps <= 0:  # no head: the final multi-step policy is the checkpoint
            if not progress.done("consistency"):
                policy.save_pretrained(run_dir / "checkpoint", train_config=train_cfg,
                                       meta={"stage": "final", "behaviour": progress.data["behaviour"]})
                progress.mark("consistency")
            raise Finished
        if not progress.done("consistency"):
            state_dir = run_dir / "train_state_consistency"
            if not (state_dir / "train_state.json").exists():
                policy.init_consistency_from_teacher()
            train_phase("consistency", policy, policy.consistency_loss, cfg.distill.consistency_steps, cfg,
                        dataset, gen, state_dir, logger, device,
                        params=list(policy.consistency_unet.parameters()),
                        after_step=policy.update_consistency_ema)
            policy.save_pretrained(run_dir / "checkpoint", train_config=train_cfg,
                                   meta={"stage": "final", "behaviour": progress.data["behaviour"]})
            progress.mark("consistency")
        policy = load_policy(run_dir / "checkpoint", device)[0]
        for k, name in ((1, "consistency"), (2, "consistency_2")):  # the 1-step head (and 2 steps)
            if name not in progress.data["evals"]:
                policy.set_sampler("consistency", consistency_steps=k)
                evaluate(runner, policy, cfg, name, progress, logger, step)
        policy.set_sampler("ddim_eta", num_inference_steps=rcfg.num_inference_steps, eta=rcfg.eta,
                           min_std=rcfg.min_std)
        latency = {"ddim_eta": chunk_latency_ms(policy, demos["state"].shape[-1])}
        policy.set_sampler("consistency", consistency_steps=1)
        latency["consistency"] = chunk_latency_ms(policy, demos["state"].shape[-1])
        n = policy.config.n_action_steps
        progress.data["latency_ms_per_action"] = {k: v / n for k, v in latency.items()}
        progress.save()
    except Finished:
        pass
    except OutOfTime:
        print(f"[rl100] time budget of {rcfg.time_budget_s:.0f} s used; rerun the same command to resume")
        logger.close()
        return {**_final_report(progress), "complete": False}
    logger.close()
    report = {**_final_report(progress), "complete": True, "checkpoint": str(run_dir / "checkpoint")}
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _final_report(progress: Progress) -> dict[str, Any]:
    """The behaviour policy's latest evaluation as the headline (train.py prints it), every stage's
    figures (the 1-step head's under ``evals["consistency"]``), the gate decisions and latencies."""
    evals = progress.data["evals"]
    multi_step = [k for k in evals if not k.startswith("consistency")]
    last = evals[multi_step[-1]] if multi_step else {}
    return {**last, "evals": evals, "decisions": progress.data["decisions"],
            "latency_ms_per_action": progress.data.get("latency_ms_per_action")}
