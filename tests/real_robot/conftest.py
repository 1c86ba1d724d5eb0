"""Fixtures of the robot-bridge tests: CURVE keys and tiny checkpoints."""

from __future__ import annotations

import pytest
from bridge_helpers import PICKCUBE_TASK, tiny_mlp


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory):
    from embodied_distill.real_robot.auth import ensure_keys

    root = tmp_path_factory.mktemp("keys")
    ensure_keys(root)
    return str(root)


@pytest.fixture(scope="session")
def pointmass_checkpoint(tmp_path_factory):
    """A tiny MLP checkpoint with 7-D state and actions (the point-mass robot's)."""
    path = tmp_path_factory.mktemp("ckpt") / "pointmass"
    tiny_mlp().save_pretrained(path, train_config={"eval": {"seed_start": 1000}})
    return path


@pytest.fixture(scope="session")
def pickcube_checkpoint(tmp_path_factory):
    """A tiny random MLP checkpoint with PickCube's 42-D state and 7-D actions, task config included."""
    path = tmp_path_factory.mktemp("ckpt") / "pickcube"
    tiny_mlp(obs_dim=42).save_pretrained(path, train_config={"task": dict(PICKCUBE_TASK),
                                                              "eval": {"seed_start": 100000}})
    return path
