"""Where a COMPASS policy fails on the so100 (PickCube): one line per seed, then the counts.

    python scripts/probes/so100_failures.py RUN_DIR [EPISODES] [base|specialist]

Steps the run's IL base (or so100 specialist) on seeds 7000+ (one CPU env, 120 steps) and sorts each
episode by ManiSkill's per-step info: success at the end; cube at the goal at some step but not at the end
with the arm still ("placed_not_at_end"); grasp lost; never grasped; grasped but never at the goal.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from embodied_distill.policies.base import load_policy
from embodied_distill.sim.maniskill import ManiSkillEnvConfig, make_single_env


def flag(info, key: str) -> bool:
    return bool(np.asarray(info[key]).reshape(-1)[0])


def main() -> None:
    run, n = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 30
    who = sys.argv[3] if len(sys.argv) > 3 else "base"
    torch.set_num_threads(1)
    if who == "base":
        pol = load_policy(run / "base" / "checkpoint")[0].as_embodiment("so100").eval()
    else:
        pol = load_policy(run / "specialists" / "so100" / "checkpoint")[0].eval()
    env = make_single_env(ManiSkillEnvConfig(control_mode="pd_joint_pos", robot_uids="so100",
                                             max_episode_steps=120, sim_backend="cpu"))
    counts: dict[str, int] = {}
    for s in range(n):
        obs, _ = env.reset(seed=7000 + s)
        pol.reset()
        first_grasp, grasped_steps, placed_steps = None, 0, 0
        for t in range(120):
            action = pol.select_action({"state": torch.as_tensor(np.asarray(obs, np.float32)).reshape(1, -1)})
            obs, _, _, _, info = env.step(np.asarray(action).reshape(-1))
            grasped = flag(info, "is_grasped")
            first_grasp = t if grasped and first_grasp is None else first_grasp
            grasped_steps += grasped
            placed_steps += flag(info, "is_obj_placed")
        if flag(info, "success"):
            kind = "success"
        elif first_grasp is None:
            kind = "never_grasped"
        elif placed_steps:
            kind = "placed_not_at_end"
        else:
            kind = "grasped_not_placed" if grasped else "grasp_lost"
        counts[kind] = counts.get(kind, 0) + 1
        print(f"seed {7000 + s}: {kind:18s} first grasp at step {first_grasp}, grasped {grasped_steps} "
              f"steps, cube at the goal {placed_steps} steps", flush=True)
    env.close()
    print(counts)


if __name__ == "__main__":
    main()
