"""How exploration noise affects the so100 IL base of a COMPASS run (PickCube, 120 steps, seeds 7000+).

    python scripts/probes/so100_noise.py RUN_DIR [EPISODES] [STD_RAD]

Adds to the base's arm joint targets either nothing, white Gaussian noise (std STD_RAD per joint per
step, as a residual PPO policy explores), or noise fixed within an episode: a linear map of random state
features drawn once per episode (gSDE-like), scaled to the same per-step size. Prints the successes at
the end and at any step for each.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from embodied_distill.policies.base import load_policy
from embodied_distill.sim.maniskill import ManiSkillEnvConfig, make_single_env


def main() -> None:
    run = Path(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    std = float(sys.argv[3]) if len(sys.argv) > 3 else 0.018
    torch.set_num_threads(1)
    pol = load_policy(run / "base" / "checkpoint")[0].as_embodiment("so100").eval()
    env = make_single_env(ManiSkillEnvConfig(control_mode="pd_joint_pos", robot_uids="so100",
                                             max_episode_steps=120, sim_backend="cpu"))
    rng = np.random.default_rng(0)
    obs_dim, act_dim = int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape))
    feat = 64
    proj = rng.standard_normal((obs_dim, feat)) / np.sqrt(obs_dim)
    for mode in ("none", "white", "per_episode"):
        at_end = once = 0
        for s in range(n):
            obs, _ = env.reset(seed=7000 + s)
            pol.reset()
            weights = rng.standard_normal((feat, act_dim)) * std / np.sqrt(feat / 2)
            hit = False
            for _ in range(120):
                state = np.asarray(obs, np.float32).reshape(1, -1)
                a = np.asarray(pol.select_action({"state": torch.as_tensor(state)}), np.float64).reshape(-1)
                if mode == "white":
                    a[:-1] += rng.standard_normal(act_dim - 1) * std  # never the gripper
                elif mode == "per_episode":
                    a[:-1] += (np.tanh(state.reshape(-1) @ proj * 3) @ weights)[:-1]
                obs, _, _, _, info = env.step(a.astype(np.float32))
                hit |= bool(np.asarray(info["success"]).reshape(-1)[0])
            at_end += bool(np.asarray(info["success"]).reshape(-1)[0])
            once += hit
        print(f"{mode:11s} noise {std} rad: success at the end {at_end}/{n}, at any step {once}/{n}",
              flush=True)
    env.close()


if __name__ == "__main__":
    main()
