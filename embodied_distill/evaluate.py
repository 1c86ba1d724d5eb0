"""Headless evaluation of a checkpoint: ``python -m embodied_distill.evaluate checkpoint=DIR episodes=N``.

Rebuilds the policy and the simulator from the checkpoint's own ``config.yaml`` and writes
``report.json`` (and ``eval.mp4`` when rendering works) into the Hydra run directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from embodied_distill.checkpoint import CheckpointError
from embodied_distill.policies.base import load_policy
from embodied_distill.train import make_runner, print_summary, quiet, resolve_device


@hydra.main(config_path="pkg://embodied_distill.configs", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> float:
    quiet()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        policy, train_cfg, meta = load_policy(cfg.checkpoint, device=resolve_device(cfg.device))
    except CheckpointError as e:
        print(f"[evaluate] error: {e}", file=sys.stderr)
        sys.exit(2)
    train_cfg = OmegaConf.create(train_cfg)
    if cfg.sampler is not None:
        if not hasattr(policy, "set_sampler"):
            print(f"[evaluate] error: sampler={cfg.sampler} given but the {policy.name} policy has "
                  "no samplers", file=sys.stderr)
            sys.exit(2)
        policy.set_sampler(cfg.sampler, **(OmegaConf.to_container(cfg.sampler_overrides, resolve=True) or {}))
    if not hasattr(policy, "as_embodiment"):
        runner = make_runner(train_cfg)
    else:  # a COMPASS base or generalist: one network, several robots
        names = [e["name"] for e in policy.config.embodiments]
        if cfg.get("embodiment") not in names:
            print(f"[evaluate] error: this checkpoint acts for the robots {names}; pass embodiment=NAME "
                  f"(got {cfg.get('embodiment')})", file=sys.stderr)
            sys.exit(2)
        from embodied_distill.distill.compass import CompassConfig
        from embodied_distill.distill.compass import make_runner as embodiment_runner

        emb = next(e for e in CompassConfig.from_cfg(train_cfg.distill).embodiments
                   if e.name == cfg.embodiment)
        policy, runner = policy.as_embodiment(cfg.embodiment), embodiment_runner(train_cfg, emb)
    seed_start = cfg.seed_start if cfg.seed_start is not None else train_cfg.eval.seed_start
    if "max_demo_seed" in meta and seed_start <= meta["max_demo_seed"]:
        print(f"[evaluate] warning: seed_start={seed_start} overlaps demo seeds (<= {meta['max_demo_seed']})")
    report = runner.evaluate(
        policy.to("cpu"), cfg.episodes, seed_start, num_envs=cfg.num_envs,
        video_path=run_dir / "eval.mp4" if cfg.video_episodes > 0 else None,
        video_episodes=cfg.video_episodes)
    report["checkpoint"] = str(Path(cfg.checkpoint).resolve())
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    print_summary(report, run_dir)
    return report["success_rate"]


if __name__ == "__main__":
    main()
