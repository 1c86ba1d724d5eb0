"""configs/deploy.yaml and the configs/robot group compose, build and instantiate."""

from __future__ import annotations

from pathlib import Path

import pytest
from embodied_distill.real_robot.deployment import (
    loop_config,
    resolve_task,
    safety_config,
    server_config,
)
from hydra import compose, initialize_config_module
from hydra.errors import MissingConfigException
from hydra.utils import get_class, instantiate

REPO = Path(__file__).resolve().parents[2]
ROBOTS = sorted(p.stem for p in (REPO / "configs" / "robot").glob("*.yaml"))


def test_every_robot_option_composes_and_its_driver_resolves():
    assert {"sim", "remote", "pointmass"} <= set(ROBOTS)
    with initialize_config_module(config_module="embodied_distill.configs", version_base="1.3"):
        for robot in ROBOTS:
            cfg = compose(config_name="deploy", overrides=[f"robot={robot}", "task=pickcube"])
            assert cfg.robot.name == robot, f"robot/{robot}.yaml must set name: {robot}"
            assert cfg.robot.driver._partial_ is True
            assert callable(get_class(cfg.robot.driver._target_))
        cfg = compose(config_name="deploy", overrides=["robot=pointmass", "robot.driver.realtime=false"])
        driver = instantiate(cfg.robot.driver)(task=None)
        try:
            assert driver.limits().action_dim == 7 and driver.home(seed=0).seq == 0
        finally:
            driver.close()
        cfg = compose(config_name="deploy", overrides=[
            "control.strategy=rti", "control.async_inference=true", "safety.workspace_low=[0.3,-0.2,0.0]",
            "safety.workspace_high=[0.8,0.2,0.5]", "server.port=0"])
        assert loop_config(cfg.control).strategy == "rti"
        assert safety_config(cfg.safety).workspace_low == (0.3, -0.2, 0.0)
        assert server_config(cfg.server).host == "127.0.0.1" and cfg.mode == "run" and cfg.get("task") is None
        with pytest.raises(ValueError, match="strategy"):
            loop_config({**dict(cfg.control), "strategy": "teleport"})
        with pytest.raises(MissingConfigException) as e:  # a wrong choice lists the valid options
            compose(config_name="deploy", overrides=["robot=nosuchrobot"])
        assert "Available options in 'robot'" in str(e.value)
        assert all(option in str(e.value) for option in ROBOTS)


def test_the_task_comes_from_the_checkpoint_unless_given_and_must_match_it():
    trained = {"task": {"name": "pickcube", "env_id": "PickCube-v1", "control_mode": "pd_ee_delta_pose",
                        "obs_mode": "state"}}
    with initialize_config_module(config_module="embodied_distill.configs", version_base="1.3"):
        assert resolve_task(compose(config_name="deploy"), trained)["name"] == "pickcube"
        chosen = compose(config_name="deploy", overrides=["task=pickcube"])
        assert resolve_task(chosen, trained)["env_id"] == "PickCube-v1"
        with pytest.raises(ValueError, match="was trained with"):
            resolve_task(compose(config_name="deploy", overrides=["task=pushcube"]), trained)
        assert resolve_task(compose(config_name="deploy"), {}) is None
