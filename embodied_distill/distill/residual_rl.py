"""Residual RL: PPO trains a zero-initialised residual on top of a frozen base policy (the teacher).

``a = clip(base(obs) + residual_scale * residual([obs, base(obs)]))``; the residual's mean head starts
at zero, so training starts exactly at the base's behaviour (COMPASS, NVlabs/COMPASS, stage 2; see
``shared/reference/methods.md``). The base is driven inside the env wrapper with its own observation
history (:class:`embodied_distill.policies.rl.envs.ManiSkillRLEnv`); PPO is the RPD learner with
``lambda = 0`` (:mod:`embodied_distill.distill.rpd`). The checkpoint holds the base's weights and
normaliser, so ``python -m embodied_distill.evaluate checkpoint=...`` needs nothing else.

Reads top to bottom: (1) base (``teacher=checkpoint teacher.path=DIR``), (2) env + residual policy,
(3) training with periodic evaluation, (4) checkpoint, (5) final evaluation -> ``report.json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from embodied_distill.distill.rpd import RPDConfig, env_factory, load_teacher, teacher_obs_horizon, train_rl


def run(cfg: DictConfig, run_dir: Path, runner, device: torch.device) -> dict[str, Any]:
    rcfg = dataclasses.replace(RPDConfig.from_cfg(cfg.distill), distill_coef=0.0)
    if not hasattr(runner, "env_cfg"):
        raise ValueError("residual_rl needs a ManiSkill runner (sim=maniskill)")
    # ---------------------------------------------------------------- 1. frozen base
    base = load_teacher(cfg.get("teacher"), device="cpu")
    if base is None:
        raise ValueError("residual_rl needs a base policy: teacher=checkpoint teacher.path=<checkpoint dir>")
    if not (hasattr(base, "policy_config_dict") and hasattr(base, "normalizer")):
        raise TypeError("residual_rl saves the base inside its checkpoint, so the base must be a local "
                        f"Policy with weights (got {type(base).__name__})")
    base.eval()
    history = max(rcfg.net_obs_horizon, teacher_obs_horizon(base, cfg.get("teacher")))
    return train_residual(cfg, run_dir, runner, device, rcfg, base, history)


def train_residual(cfg: DictConfig, run_dir: Path, runner, device: torch.device, rcfg: RPDConfig, base,
                   history: int, tag: str = "residual_rl") -> dict[str, Any]:
    """Steps 2-5 on a frozen, local ``base`` Policy (COMPASS calls this once per embodiment): build the
    env and the zero-initialised residual policy, train, checkpoint, evaluate; returns the report."""
    # ---------------------------------------------------------------- 2. env + residual policy
    make_env = env_factory(runner, history, base, rcfg.residual_scale,
                           rcfg.train_seed_start + 10_000 * int(cfg.seed))
    probe = make_env(0)()
    obs_dim, action_dim = probe.obs_dim, probe.action_dim
    low, high = float(probe.low.min()), float(probe.high.max())
    probe.close()
    from embodied_distill.policies.rl.configuration_rl import ResidualPolicyConfig
    from embodied_distill.policies.rl.modeling_rl import ResidualPolicy

    pcfg = ResidualPolicyConfig(obs_dim=obs_dim, action_dim=action_dim, obs_horizon=history,
                                net_obs_horizon=rcfg.net_obs_horizon, extra_dim=action_dim,
                                hidden_dims=rcfg.hidden_dims, activation=rcfg.activation,
                                log_std_init=rcfg.log_std_init, action_low=low, action_high=high,
                                base_policy=base.policy_config_dict(), residual_scale=rcfg.residual_scale)
    policy = ResidualPolicy(pcfg, base.normalizer)
    policy.base.load_state_dict(base.state_dict())  # its own copy: evaluation never disturbs the env's base
    policy.to(device)
    print(f"[{tag}] base {base.name} ({sum(p.numel() for p in base.parameters())} params, frozen), "
          f"residual {sum(p.numel() for p in policy.actor_critic.parameters())} params, "
          f"scale {rcfg.residual_scale}")
    # ---------------------------------------------------------------- 3-5. train, checkpoint, evaluate
    return train_rl(cfg, run_dir, runner, device, rcfg, policy, make_env, None, history, history, tag=tag)
