"""Robot bridge: a PickCube checkpoint deployed to the real-time sim driver through the policy server in a
separate process over loopback, against direct evaluation on the same seeds.

    python benchmarks/bridge.py [--quick] [--out DIR] [--checkpoint DIR]

Reference: ``ManiSkillRunner.evaluate`` (the policy called in-process, the env stepped as fast as it
goes; success = ManiSkill's flag at the last step of the 50-step episode). Bridge rows: the same
checkpoint served by ``python -m embodied_distill.real_robot.server`` (CURVE-authenticated ZeroMQ on
127.0.0.1, its own process), ``RemotePolicy`` in this process, the fixed-rate ``ControlLoop`` at the env's
20 Hz with the safety filter, and ``SimDriver`` stepping ManiSkill in real time in a physics thread; every
episode is logged to a zarr store. Same seeds everywhere (the checkpoint's ``eval.seed_start`` up).

Rows: ``open_loop`` (the checkpoint's own chunking: the claim, success within 5 points of direct),
``open_loop + async`` (next chunk computed while executing), ``temporal_ensemble`` (re-plan every tick,
ACT weights), ``streaming`` (re-plan every 2 ticks into an action buffer) and ``open_loop, Panda
limits`` (the sim robot given a real Panda's Cartesian velocity / acceleration limits, 1.7 m/s,
13 m/s^2, 2.5 rad/s, 25 rad/s^2, so the safety filter actually clamps). Two attribution rows run the same
server, client, loop, filter and driver with the sim stepped inside ``command()`` (no real time):
``lockstep, default safety`` and ``lockstep, safety filter inactive`` (wide workspace, no gripper
dwell), which separate what the safety filter changes from what real-time execution changes.

Figures per row: success, agreement with direct evaluation seed by seed, loop **jitter** (how late each
tick started, p50 / p99), **end-to-end latency per action** (tick start -> command delivered to the
robot: observe + policy request over the network when one is due + safety filter + command, p50 / p99),
policy request round trip, **action age** (the observation an action was computed from -> its
command; includes the chunking), missed robot periods, safety interventions.
Full run: 100 episodes for ``open_loop`` and the lock-step rows, 50 for the others; ``--quick``: 10 each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_OUT, REPO_ROOT, machine_info, write_results  # noqa: E402

DEFAULT_CHECKPOINT = REPO_ROOT / "outputs" / "run1" / "checkpoint"
PANDA_LIMITS = {"ee_max_speed": 1.7, "ee_max_accel": 13.0, "rot_max_speed": 2.5, "rot_max_accel": 25.0}


def rows(quick: bool) -> list[dict[str, Any]]:
    n_main, n_other = (10, 10) if quick else (100, 50)
    return [
        {"name": "open_loop", "episodes": n_main, "loop": {"strategy": "open_loop"}},
        {"name": "open_loop + async", "episodes": n_other, "loop": {"strategy": "open_loop",
                                                                    "async_inference": True}},
        {"name": "temporal_ensemble", "episodes": n_other, "loop": {"strategy": "temporal_ensemble"}},
        {"name": "streaming (stride 2)", "episodes": n_other,
         "loop": {"strategy": "streaming", "stream_stride": 2}},
        {"name": "open_loop, Panda limits", "episodes": n_other, "loop": {"strategy": "open_loop"},
         "driver": PANDA_LIMITS},
        # the same server, client, loop, filter and driver with the sim stepped inside command() (no
        # real time): separates what the safety filter changes from what timing changes
        {"name": "lockstep, default safety", "episodes": n_main,
         "loop": {"strategy": "open_loop", "rate_hz": 50}, "driver": {"realtime": False},
         "safety": {"watchdog_periods": 1000}},
        {"name": "lockstep, safety filter inactive", "episodes": n_main,
         "loop": {"strategy": "open_loop", "rate_hz": 50},
         "driver": {"realtime": False, "workspace_low": (-5, -5, -5), "workspace_high": (5, 5, 5)},
         "safety": {"watchdog_periods": 1000, "gripper_min_dwell_steps": 0}},
    ]


def direct_evaluation(checkpoint: Path, task: dict, episodes: int, seed_start: int) -> dict[str, Any]:
    import torch
    from embodied_distill.policies.base import load_policy
    from embodied_distill.sim.maniskill import ManiSkillRunner

    policy, _, _ = load_policy(checkpoint, device="cpu")
    t0 = time.perf_counter()
    report = ManiSkillRunner(task, sim_backend="cpu").evaluate(policy, episodes, seed_start, num_envs=1)
    report["wall_s"] = time.perf_counter() - t0
    del policy
    torch.set_num_threads(1)
    return report


def bridge_row(row: dict[str, Any], remote, task: dict, seeds: list[int], drivers: dict, store: Path,
               direct: dict[int, bool]) -> dict[str, Any]:
    from embodied_distill.real_robot.control_loop import ControlLoop, ControlLoopConfig, EpisodeLogger
    from embodied_distill.real_robot.deployment import summarize_episodes
    from embodied_distill.real_robot.driver import SimDriver
    from embodied_distill.real_robot.safety import SafetyConfig

    key = repr(sorted(row.get("driver", {}).items()))
    if key not in drivers:
        drivers[key] = SimDriver(task, **row.get("driver", {}))
    driver = drivers[key]
    logger = EpisodeLogger(store, {"source": "benchmarks/bridge.py"})
    t0 = time.perf_counter()
    safety = SafetyConfig(**row.get("safety", {}))
    with ControlLoop(driver, remote, ControlLoopConfig(**row["loop"]), safety, logger=logger) as loop:
        results = []
        for i, seed in enumerate(seeds):
            results.append(loop.run_episode(seed, meta={"row": row["name"]}))
            if (i + 1) % 10 == 0:
                rate = np.mean([r.success for r in results])
                print(f"  [{row['name']}] {i + 1}/{len(seeds)} episodes, success {rate:.2f}", flush=True)
    summary = summarize_episodes(results)
    summary["wall_s"] = time.perf_counter() - t0
    ref = np.array([direct[s] for s in seeds], float)
    got = np.array([bool(r.success) for r in results], float)
    summary.update(name=row["name"], loop=row["loop"], driver=row.get("driver", {}),
                   safety=row.get("safety", {}),
                   seeds=seeds, direct_success_rate=float(ref.mean()),
                   delta_points=float(100 * (got.mean() - ref.mean())),
                   agreement=float((got == ref).mean()))
    return summary


def table(payload: dict[str, Any]) -> str:
    d = payload["direct"]

    def pair(r: dict[str, Any], name: str) -> str:
        lo, hi = r.get(f"{name}_p50"), r.get(f"{name}_p99")
        return "n/a" if lo is None else f"{lo:.2f} / {hi:.2f}"

    lines = [
        f"Robot bridge, PickCube ({payload['checkpoint_name']}): deployed through the policy server "
        f"(separate process, CURVE over 127.0.0.1) to the real-time sim driver at {payload['rate_hz']:g} Hz, "
        f"vs direct evaluation on the same seeds. {payload['mode']} run, {payload['machine']['cpu_count']} "
        f"CPUs (shared, load avg {payload['load_avg_start'][0]:.1f}). Times in ms.",
        "",
        "| run | episodes | success | Δ vs direct (pts) | same outcome | jitter p50 / p99 | "
        "e2e/action p50 / p99 | policy RTT p50 / p99 | action age p50 | missed periods | safety clamps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| direct evaluation (in-process) | {d['episodes']} | {d['success_rate']:.3f} | - | - | - | "
        f"{d['latency_ms_per_action_p50']:.2f} / {d['latency_ms_per_action_p95']:.2f} (p95) | - | - | - "
        "| - |",
    ]
    for r in payload["bridge"]:
        clamps = {k: v for k, v in r["safety_counts"].items() if k not in ("GRIPPER_SNAPPED",)}
        clamp_txt = ", ".join(f"{k.lower()} {v}" for k, v in sorted(clamps.items())) or "none"
        age = r.get("action_age_ms_p50")
        lines.append(
            f"| bridge: {r['name']} | {r['episodes']} | {r['success_rate']:.3f} | {r['delta_points']:+.1f} | "
            f"{100 * r['agreement']:.0f}% | {pair(r, 'jitter_ms')} | {pair(r, 'e2e_ms')} | "
            f"{pair(r, 'inference_ms')} | {'n/a' if age is None else f'{age:.0f}'} | {r['missed_periods']} | "
            f"{clamp_txt} |")
    main = payload["bridge"][0]
    within = "within" if abs(main["delta_points"]) <= 5 else "NOT within"
    by_name = {r["name"]: r for r in payload["bridge"]}
    lines += [
        "",
        f"Claim: `{main['name']}` success {main['success_rate']:.3f} vs direct "
        f"{main['direct_success_rate']:.3f} on the same {main['episodes']} seeds: "
        f"{abs(main['delta_points']):.1f} points apart ({within} the 5-point target).",
    ]
    if {"lockstep, default safety", "lockstep, safety filter inactive"} <= set(by_name):
        lock, free = by_name["lockstep, default safety"], by_name["lockstep, safety filter inactive"]
        n = min(lock["episodes"], main["episodes"])
        same = np.mean(np.array(lock["per_episode_success"][:n]) == np.array(main["per_episode_success"][:n]))
        lines.append(
            f"Where outcomes differ: with the filter inactive (wide workspace, no gripper dwell) the bridge "
            f"reproduces direct evaluation on {100 * free['agreement']:.0f}% of seeds; the default filter's "
            f"interventions (workspace floor, gripper dwell) flip {100 * (1 - lock['agreement']):.0f}% of "
            f"outcomes both ways (success {lock['success_rate']:.3f}); real time then agrees with lock-step "
            f"on {100 * same:.0f}% of seeds.")
    lines += [
        "jitter = how late a tick started; e2e/action = tick start -> command delivered (observe, policy "
        "request over the network when one is due, safety filter, command); policy RTT = one "
        "`predict_chunk` round trip; action age = observation behind the action -> its command (includes "
        "open-loop chunking and the sim's half-period phase); direct evaluation's latency is its in-process "
        "`select_action` time per step. Safety clamps exclude gripper snapping to open/closed.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 episodes per row (a few minutes)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results directory")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="PickCube checkpoint dir")
    parser.add_argument("--episodes", type=int, default=None, help="override every row's episodes (smoke)")
    args = parser.parse_args(argv)

    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import torch
    from embodied_distill.real_robot.client import RemotePolicy
    from embodied_distill.real_robot.rpc import ServerConfig
    from embodied_distill.real_robot.server import spawn_policy_server

    from embodied_distill.checkpoint import load_checkpoint
    from embodied_distill.train import quiet

    quiet()
    torch.set_num_threads(1)
    checkpoint = Path(args.checkpoint).resolve()
    train_cfg = load_checkpoint(checkpoint)[2]
    task, seed_start = train_cfg["task"], int(train_cfg.get("eval", {}).get("seed_start", 100000))
    plan = rows(args.quick)
    if args.episodes is not None:
        plan = [{**r, "episodes": args.episodes} for r in plan]
    n_direct = max(r["episodes"] for r in plan)
    t_start = time.perf_counter()
    load_start = os.getloadavg()

    print(f"[bridge] direct evaluation: {n_direct} episodes from seed {seed_start}", flush=True)
    direct = direct_evaluation(checkpoint, task, n_direct, seed_start)
    direct_by_seed = {e["seed"]: e["success"] for e in direct["per_episode"]}
    print(f"[bridge] direct success {direct['success_rate']:.3f}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="bridge_bench_"))
    drivers: dict = {}
    results = []
    server = spawn_policy_server(checkpoint, ServerConfig(port=0, keys_dir=str(tmp / "keys")))
    try:
        remote = RemotePolicy(server.address, keys_dir=str(tmp / "keys"), timeout_s=2.0)
        print(f"[bridge] policy server pid {server.pid} at {server.address} (CURVE)", flush=True)
        for row in plan:
            seeds = list(range(seed_start, seed_start + row["episodes"]))
            print(f"[bridge] {row['name']}: {len(seeds)} episodes", flush=True)
            r = bridge_row(row, remote, task, seeds, drivers, tmp / "episodes.zarr", direct_by_seed)
            results.append(r)
            print(f"[bridge] {row['name']}: success {r['success_rate']:.3f} "
                  f"(direct {r['direct_success_rate']:.3f}), jitter p99 {r['jitter_ms_p99']:.2f} ms, "
                  f"e2e p50 {r['e2e_ms_p50']:.2f} ms", flush=True)
        remote.close()
    finally:
        server.close()
        for d in drivers.values():
            d.close()
    from embodied_distill.data.episode_store import EpisodeStore

    store = EpisodeStore(tmp / "episodes.zarr", mode="r")
    logged = {"episodes": store.n_episodes, "steps": store.n_steps, "keys": store.keys}
    shutil.rmtree(tmp, ignore_errors=True)

    direct_small = {k: v for k, v in direct.items() if k not in ("per_episode", "seeds")}
    payload = {
        "mode": "quick" if args.quick else "full",
        "checkpoint": str(checkpoint), "checkpoint_name": checkpoint.parent.name + "/" + checkpoint.name,
        "task": task.get("name"), "env_id": task.get("env_id"), "control_mode": task.get("control_mode"),
        "seed_start": seed_start, "rate_hz": 20.0, "load_avg_start": list(load_start),
        "load_avg_end": list(os.getloadavg()),
        "direct": {**direct_small, "per_episode_success": [e["success"] for e in direct["per_episode"]]},
        "bridge": [{k: v for k, v in r.items() if k != "per_episode"} | {
            "per_episode_success": [e["success"] for e in r["per_episode"]]} for r in results],
        "episodes_logged": logged,
        "wall_s": time.perf_counter() - t_start,
        "machine": machine_info(),
        "definitions": {
            "jitter_ms": "tick start - scheduled tick start (monotonic clock)",
            "e2e_ms": "tick start (observe) -> command delivered to the driver",
            "inference_ms": "predict_chunk round trip over the network, as seen by the loop",
            "action_age_ms": "robot timestamp of the observation the action was computed from -> its command",
            "obs_to_command_ms": "robot timestamp of this tick's observation -> command",
        },
    }
    md = table(payload)
    print("\n" + md)
    path = write_results("bridge", payload, md, args.out)
    print(f"\n[bridge] wrote {path} and {path.with_suffix('.md')} in {payload['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
