"""Glue from ``configs/deploy.yaml`` to a running deployment, policy server or robot server.

Used by ``python -m embodied_distill.deploy`` (all modes), ``python -m embodied_distill.real_robot.server``
(mode=serve) and ``python -m embodied_distill.real_robot.robot_server`` (mode=robot), and by
``benchmarks/bridge.py`` (:func:`summarize_episodes`).
"""

from __future__ import annotations

import json
import signal
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from embodied_distill.real_robot.control_loop import (
    ControlLoop,
    ControlLoopConfig,
    EpisodeLogger,
    EpisodeResult,
)
from embodied_distill.real_robot.rpc import ClientConfig, ServerConfig
from embodied_distill.real_robot.safety import EStop, SafetyConfig
from omegaconf import DictConfig, OmegaConf

MODES = ("run", "serve", "robot")
POLICY_SOURCES = ("local", "server", "remote")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def server_config(node: Any, port: int | None = None) -> ServerConfig:
    """``ServerConfig`` from a ``server``-style node (host, port, auth, keys_dir, max_message_bytes)."""
    d = dict(_plain(node))
    return ServerConfig(host=str(d.get("host", "127.0.0.1")),
                        port=int(d.get("port", 0) if port is None else port),
                        auth=bool(d.get("auth", True)), keys_dir=d.get("keys_dir"),
                        max_message_bytes=int(d.get("max_message_bytes", 16 * 2**20)))


def loop_config(node: Any) -> ControlLoopConfig:
    return ControlLoopConfig(**dict(_plain(node)))


def safety_config(node: Any) -> SafetyConfig:
    return SafetyConfig(**dict(_plain(node)))


def resolve_task(cfg: DictConfig, train_cfg: dict | None) -> dict | None:
    """The task to run: ``task=`` when given (checked against the checkpoint's), else the checkpoint's."""
    chosen = _plain(cfg.get("task")) if cfg.get("task") is not None else None
    trained = (train_cfg or {}).get("task")
    if chosen and trained:
        for key in ("env_id", "control_mode", "obs_mode"):
            if chosen.get(key) != trained.get(key):
                raise ValueError(f"task={chosen.get('name')} has {key}={chosen.get(key)!r} but the "
                                 f"checkpoint was trained with {trained.get(key)!r} "
                                 f"(task={trained.get('name')})")
    return chosen or trained


def make_driver(cfg: DictConfig, task: dict | None):
    """Instantiate ``robot.driver`` (a partial) with the task."""
    from hydra.utils import instantiate

    return instantiate(cfg.robot.driver)(task=task)


def _percentiles(values: Sequence[float] | np.ndarray, name: str) -> dict[str, float | None]:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {f"{name}_p50": None, f"{name}_p99": None, f"{name}_max": None}
    return {f"{name}_p50": float(np.percentile(v, 50)), f"{name}_p99": float(np.percentile(v, 99)),
            f"{name}_max": float(v.max())}


def summarize_episodes(results: Sequence[EpisodeResult]) -> dict[str, Any]:
    """Success and timing over deployed episodes (per-tick and per-request figures pooled)."""
    known = [r.success for r in results if r.success is not None]
    safety: Counter[str] = Counter()
    for r in results:
        safety.update(r.safety_counts)
    out: dict[str, Any] = {
        "episodes": len(results),
        "success_rate": float(np.mean(known)) if known else None,
        "steps": int(sum(r.steps for r in results)),
        "overruns": int(sum(r.overruns for r in results)),
        "missed_periods": int(sum(int(r.driver_info.get("missed_periods", 0)) for r in results)),
        "inference_errors": int(sum(r.inference_errors for r in results)),
        "safety_counts": dict(safety),
        "end_reasons": dict(Counter(r.end_reason.split(":")[0] for r in results)),
    }
    pools = {"jitter_ms": [r.jitter_ms for r in results], "e2e_ms": [r.e2e_ms for r in results],
             "obs_to_command_ms": [r.obs_to_command_ms for r in results],
             "action_age_ms": [r.action_age_ms for r in results],
             "inference_ms": [r.inference_ms for r in results]}
    for name, arrays in pools.items():
        out.update(_percentiles(np.concatenate(arrays) if arrays else np.zeros(0), name))
    out["per_episode"] = [{"seed": r.seed, "success": r.success, "steps": r.steps, "end_reason": r.end_reason,
                           "overruns": r.overruns, "inference_errors": r.inference_errors,
                           "missed_periods": int(r.driver_info.get("missed_periods", 0))} for r in results]
    return out


def open_policy(cfg: DictConfig) -> tuple[Any, dict, Callable[[], None], str]:
    """The policy for mode=run: ``(policy, train_config, close, description)`` per ``policy.source``."""
    from embodied_distill.real_robot.client import RemotePolicy

    source = cfg.policy.source
    if source not in POLICY_SOURCES:
        raise ValueError(f"policy.source must be one of {POLICY_SOURCES}, got {source!r}")
    if source in ("local", "server") and not cfg.checkpoint:
        raise ValueError(f"policy.source={source} needs checkpoint=DIR")
    train_cfg: dict = {}
    if cfg.checkpoint:
        from embodied_distill.checkpoint import load_checkpoint

        train_cfg = load_checkpoint(cfg.checkpoint)[2]
    if source == "local":
        import torch
        from embodied_distill.policies.base import load_policy

        from embodied_distill.train import resolve_device

        if cfg.torch_threads > 0:
            torch.set_num_threads(int(cfg.torch_threads))
        policy, train_cfg, _ = load_policy(cfg.checkpoint, device=resolve_device(cfg.device))
        return policy, train_cfg, lambda: None, f"local {cfg.checkpoint}"
    if source == "server":
        from embodied_distill.real_robot.server import spawn_policy_server

        proc = spawn_policy_server(cfg.checkpoint, server_config(cfg.server, port=0), device=str(cfg.device))
        try:
            policy = RemotePolicy(client=ClientConfig(address=proc.address, auth=bool(cfg.server.auth),
                                                      keys_dir=cfg.server.keys_dir,
                                                      timeout_s=float(cfg.policy.timeout_s)))
        except BaseException:
            proc.close()
            raise

        def close() -> None:
            policy.close()
            proc.close()

        return policy, train_cfg, close, f"server process pid {proc.pid} at {proc.address}"
    if not cfg.policy.address:
        raise ValueError("policy.source=remote needs policy.address=tcp://HOST:PORT")
    policy = RemotePolicy(client=ClientConfig(address=str(cfg.policy.address), auth=bool(cfg.server.auth),
                                              keys_dir=cfg.server.keys_dir, server_key=cfg.policy.server_key,
                                              timeout_s=float(cfg.policy.timeout_s)))
    if not train_cfg and policy.info.get("task"):
        train_cfg = {"task": {"name": policy.info.get("task"), "env_id": policy.info.get("env_id"),
                              "control_mode": policy.info.get("control_mode"), "obs_mode": "state"}}
    return policy, train_cfg, policy.close, f"remote server {cfg.policy.address}"


def run_deploy(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """mode=run: episodes of the checkpoint on the robot; writes ``report.json`` and ``episodes.zarr``."""
    from embodied_distill.real_robot.estop import EStopEndpoint

    policy, train_cfg, close_policy, described = open_policy(cfg)
    estop = EStop()
    cleanup: list[Callable[[], None]] = [close_policy, estop.close]
    try:
        task = resolve_task(cfg, train_cfg)
        if cfg.robot.name == "sim" and not task:
            raise ValueError("robot=sim needs a task: task=pickcube (or a checkpoint that names one)")
        driver = make_driver(cfg, task)
        cleanup.insert(0, driver.close)
        if cfg.estop.signals:
            estop.install_signal_handlers([getattr(signal, str(s)) for s in cfg.estop.signals])
        endpoint = None
        if cfg.estop.endpoint:
            endpoint = EStopEndpoint(estop, server_config({**_plain(cfg.server), "host": cfg.estop.host},
                                                          port=int(cfg.estop.port))).start()
            cleanup.insert(0, endpoint.stop)
        store = Path(str(cfg.log.store))
        logger = EpisodeLogger(store, attrs={
            "source": "embodied_distill.deploy", "robot": cfg.robot.name, "checkpoint": str(cfg.checkpoint),
            "policy": described, "task": (task or {}).get("name"), "strategy": cfg.control.strategy,
            "async_inference": bool(cfg.control.async_inference)})
        loop = ControlLoop(driver, policy, loop_config(cfg.control), safety_config(cfg.safety), estop, logger)
        cleanup.insert(0, loop.close)
        seed_start = cfg.seed_start if cfg.seed_start is not None else \
            int((train_cfg.get("eval") or {}).get("seed_start", 100000))
        print(f"[deploy] policy: {described}\n[deploy] robot: {cfg.robot.name} ({type(driver).__name__}), "
              f"loop {loop.rate_hz:g} Hz, strategy {cfg.control.strategy}"
              f"{' + async inference' if cfg.control.async_inference else ''}\n[deploy] episodes -> {store}"
              + (f"\n[deploy] e-stop: {endpoint.address} (or kill -USR1 <pid>)" if endpoint else ""),
              flush=True)
        results = []
        for i in range(int(cfg.episodes)):
            if estop.triggered:
                break
            r = loop.run_episode(seed_start + i)
            results.append(r)
            print(f"[deploy] episode {i} seed {seed_start + i}: success={r.success} steps={r.steps} "
                  f"({r.end_reason}); jitter p99 {np.percentile(r.jitter_ms, 99) if r.steps else 0:.2f} ms",
                  flush=True)
        report = summarize_episodes(results)
        report.update(mode="run", robot=cfg.robot.name, task=(task or {}).get("name"), policy=described,
                      checkpoint=str(cfg.checkpoint), strategy=cfg.control.strategy,
                      async_inference=bool(cfg.control.async_inference), rate_hz=loop.rate_hz,
                      seed_start=seed_start, store=str(store), estopped=estop.triggered,
                      estop_reason=estop.reason)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "report.json").write_text(json.dumps(report, indent=2))
        print_summary(report, run_dir)
        return report
    finally:
        for fn in cleanup:
            try:
                fn()
            except Exception as e:  # keep cleaning up; the robot is already stopped or done
                print(f"[deploy] cleanup: {type(e).__name__}: {e}", file=sys.stderr)


def print_summary(report: dict[str, Any], run_dir: Path) -> None:
    def fmt(key: str) -> str:
        v = report.get(key)
        return "n/a" if v is None else f"{v:.2f}"

    rate = report["success_rate"]
    print("\n" + "=" * 72)
    print(f"run dir        : {run_dir}")
    print(f"success rate   : {'n/a' if rate is None else f'{rate:.3f}'} over {report['episodes']} episodes "
          f"(robot {report['robot']}, task {report['task']})")
    print(f"loop           : {report['rate_hz']:g} Hz, jitter p50 {fmt('jitter_ms_p50')} / "
          f"p99 {fmt('jitter_ms_p99')} ms,"
          f" {report['overruns']} overruns, {report['missed_periods']} missed robot periods")
    print(f"latency/action : observe->command p50 {fmt('e2e_ms_p50')} / p99 {fmt('e2e_ms_p99')} ms; policy "
          f"request p50 {fmt('inference_ms_p50')} / p99 {fmt('inference_ms_p99')} ms")
    print(f"safety         : {report['safety_counts'] or 'no interventions'}")
    print(f"episodes logged: {report['store']}")
    print("=" * 72)


def serve(cfg: DictConfig) -> None:
    """mode=serve: the policy server for ``checkpoint`` (blocks)."""
    from embodied_distill.real_robot.server import serve_checkpoint

    from embodied_distill.train import resolve_device

    if not cfg.checkpoint:
        raise ValueError("mode=serve needs checkpoint=DIR")
    serve_checkpoint(cfg.checkpoint, server_config(cfg.server), device=str(resolve_device(cfg.device)),
                     torch_threads=int(cfg.torch_threads))


def serve_robot_side(cfg: DictConfig) -> None:
    """mode=robot: serve the ``robot=`` driver to a remote control loop (blocks)."""
    from embodied_distill.real_robot.robot_server import serve_robot

    if cfg.robot.name == "remote":
        raise ValueError("mode=robot serves a local driver; choose robot=sim, robot=pointmass or your own")
    train_cfg = {}
    if cfg.checkpoint:
        from embodied_distill.checkpoint import load_checkpoint

        train_cfg = load_checkpoint(cfg.checkpoint)[2]
    task = resolve_task(cfg, train_cfg)
    if cfg.robot.name == "sim" and not task:
        raise ValueError("robot=sim needs a task: task=pickcube")
    node = {**_plain(cfg.server), "host": cfg.robot_server.host}
    serve_robot(make_driver(cfg, task), server_config(node, port=int(cfg.robot_server.port)),
                watchdog_periods=float(cfg.robot_server.watchdog_periods),
                max_command_lag=int(cfg.robot_server.max_command_lag))


def dispatch(cfg: DictConfig, run_dir: Path) -> Any:
    from embodied_distill.train import quiet

    quiet()
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.mode == "serve":
        return serve(cfg)
    if cfg.mode == "robot":
        return serve_robot_side(cfg)
    return run_deploy(cfg, run_dir)


def hydra_entry(mode: str | None = None) -> None:
    """Run ``configs/deploy.yaml`` through Hydra; ``mode`` forces a mode (the server entry points)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from embodied_distill.checkpoint import CheckpointError

    @hydra.main(config_path="pkg://embodied_distill.configs", config_name="deploy", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        if mode is not None:
            cfg.mode = mode
        try:
            dispatch(cfg, Path(HydraConfig.get().runtime.output_dir))
        except (ValueError, CheckpointError, FileNotFoundError) as e:
            print(f"[deploy] error: {e}", file=sys.stderr)
            sys.exit(2)

    _main()
