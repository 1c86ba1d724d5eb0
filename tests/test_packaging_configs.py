"""Packaging and config-group checks: every package is installed, every config group composes,
every _target_ instantiates, and a wrong choice lists the valid options."""

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
MAPPED = {"embodied_distill": "embodied_distill", "embodied_distill.sim": "sim",
          "embodied_distill.policies": "policies", "embodied_distill.real_robot": "real_robot",
          "embodied_distill.configs": "configs"}


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for pkg, folder in MAPPED.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    assert found - listed == set(), f"add these to [tool.setuptools] packages: {sorted(found - listed)}"


def _groups():
    return {g: sorted(p.stem for p in (REPO / "configs" / g).glob("*.yaml"))
            for g in ("sim", "task", "student", "teacher", "distill")}


def _nested_task_options():
    """Task options in sub-folders (``task=libero_spatial/<task>``): Hydra composes them, but its list of
    valid choices for a wrong ``task=`` shows only the top level, so they are checked separately."""
    root = REPO / "configs" / "task"
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.glob("*/*.yaml"))


def test_every_config_group_option_composes_and_instantiates():
    groups = _groups()
    with initialize_config_module(config_module="embodied_distill.configs", version_base="1.3"):
        for group, options in groups.items():
            for option in options:
                cfg = compose(config_name="train", overrides=[f"{group}={option}"])
                OmegaConf.to_container(cfg.demos, resolve=False)
                assert cfg[group].name == option, f"{group}/{option}.yaml must set name: {option}"
        for task in _nested_task_options():
            cfg = compose(config_name="train", overrides=[f"task={task}"])
            assert cfg.task.name == task, f"task/{task}.yaml must set name: {task}"
        for task in groups["task"] + _nested_task_options():
            cfg = compose(config_name="train", overrides=[f"task={task}"])
            if cfg.task.get("sim", cfg.sim.name) != cfg.sim.name:  # e.g. libero tasks need sim=libero
                cfg = compose(config_name="train", overrides=[f"sim={cfg.task.sim}", f"task={task}"])
            runner = instantiate(cfg.sim.runner)(task=OmegaConf.to_container(cfg.task))
            assert runner.max_episode_steps == cfg.task.max_episode_steps
        cfg = compose(config_name="evaluate", overrides=["checkpoint=/x"])
        assert cfg.episodes == 50


@pytest.mark.parametrize("override,group", [("task=nosuchtask", "task"), ("student=nope", "student")])
def test_wrong_choice_lists_valid_options_and_fails(override, group, tmp_path):
    out = subprocess.run([sys.executable, "-m", "embodied_distill.train", override], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert out.returncode != 0
    assert f"Available options in '{group}'" in out.stderr
    for option in _groups()[group]:
        assert option in out.stderr
