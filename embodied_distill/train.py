"""Training entry point: ``python -m embodied_distill.train sim=maniskill task=pickcube``.

Composes ``configs/train.yaml`` with Hydra, builds the simulation runner, and runs the method in
``embodied_distill/distill/<distill.name>.py`` (``distill.method`` where a variant config such as
``compass_nav`` names its method; each method file exposes ``run(cfg, run_dir, runner,
device) -> report``). The run directory holds ``checkpoint/``, ``train_state/``, ``metrics.jsonl``,
TensorBoard events (``tb/``), ``report.json`` and ``eval.mp4``.
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} requested but CUDA is not available")
    return torch.device(name)


def quiet() -> None:
    """Silence third-party start-up warnings that drown the progress bars."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="gymnasium")
    warnings.filterwarnings("ignore", message=".*pkg_resources.*")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::UserWarning")


def make_runner(cfg: DictConfig):
    if cfg.task.get("sim", cfg.sim.name) != cfg.sim.name:
        raise ValueError(f"task={cfg.task.name} is a {cfg.task.sim} task but sim={cfg.sim.name}")
    return instantiate(cfg.sim.runner)(task=OmegaConf.to_container(cfg.task, resolve=True))


def print_summary(report: dict, run_dir: Path) -> None:
    print("\n" + "=" * 72)
    print(f"run dir        : {run_dir}")
    print(f"task           : {report.get('task')} ({report.get('env_id')}, {report.get('control_mode')})")
    print(f"success rate   : {report['success_rate']:.3f} +- {report['success_stderr']:.3f} over "
          f"{report['episodes']} unseen seeds (success at episode end, limit "
          f"{report['max_episode_steps']} steps); success once: {report['success_once_rate']:.3f}")
    print(f"mean return    : {report['mean_return']:.2f}   steps to first success: "
          f"{report['mean_episode_length']:.1f}")
    print(f"latency/action : p50 {report['latency_ms_per_action_p50']:.2f} ms, "
          f"p95 {report['latency_ms_per_action_p95']:.2f} ms (batch of {report['num_envs']} envs)")
    if "video" in report:
        print(f"video          : {report['video']}")
    print("=" * 72)


@hydra.main(config_path="pkg://embodied_distill.configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    quiet()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    torch.manual_seed(int(cfg.seed))
    if cfg.get("torch_threads", 0) > 0:
        torch.set_num_threads(int(cfg.torch_threads))
    device = resolve_device(cfg.device)
    # a variant of a method (distill=compass_nav) names its method's module in ``method``
    module = cfg.distill.get("method", cfg.distill.name)
    method = importlib.import_module(f"embodied_distill.distill.{module}")
    report = method.run(cfg, run_dir, make_runner(cfg), device)
    if report is None:  # a non-zero rank of a torchrun job
        return 0.0
    print_summary(report, run_dir)
    return report["success_rate"]


if __name__ == "__main__":
    main()
