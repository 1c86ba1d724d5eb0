"""PPO vs RPD vs residual RL on ManiSkill state tasks, same network and env-step budget.

    python benchmarks/rpd_vs_ppo.py [--quick] [--tasks pickcube pushcube] [--seeds 0 1 2]
                                    [--steps N] [--reward-mode sparse] [--jobs 2] [--rpd KEY=VALUE ...]
                                    [--ppo-steps N] [--rpd-steps N] [--residual-steps N]
                                    [--teacher-pickcube DIR] [--stop-after-s S] [--name NAME] [--out DIR]

For each task: an imperfect teacher (behaviour cloning of an MLP on few demos, trained here with
``python -m embodied_distill.train`` unless given; its success on 50 unseen seeds is measured), then for
each seed and method one training run through the CLI (``distill=rpd teacher=none`` is PPO,
``distill=rpd teacher=checkpoint`` is RPD, ``distill=residual_rl`` is residual PPO on the frozen
teacher), ``--jobs`` at a time (each run is single-threaded; 2 on a 2-core machine). Each run's
deterministic student is evaluated every ``eval_every`` env steps on fixed held-out seeds (the curve)
and at the end on ``eval.episodes`` unseen seeds (the final success). Reported: env steps to reach 0.8
success on the curve (or "not within budget"), final success mean and spread over seeds, wall time;
plus the issue's two targets.

Finished runs are reused (their ``report.json``), so a benchmark cut short by ``--stop-after-s`` (no
new run starts after that many seconds) can be continued; the results say which runs are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from embodied_distill.sim.maniskill import REWARD_MODES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, scoped_overrides, write_results  # noqa: E402

METHODS = ("ppo", "rpd", "residual_rl")
TARGET = 0.8
# teacher_demos / teacher_steps per task: MLP BC kept imperfect (0.3-0.6 on unseen seeds, as the issue asks).
# PushCube: 10 demos, 2000 steps -> 0.40 (50 demos give 0.88). PickCube: 100 demos, 600 steps -> 0.46, an
# under-trained but smooth teacher. 50 demos and 2000 steps (0.34) overfit them: a student fitted to its
# actions on 100 of its own episodes is off by MSE 0.028 on new ones (0.007 for this teacher), so no student
# could copy it from the states it visits (README, RPD)
FULL = {"steps": 100_000, "eval_every": 5000, "eval_episodes": 20, "final_episodes": 50,
        "teacher_demos": {"pickcube": 100, "pushcube": 10},
        "teacher_steps": {"pickcube": 600, "pushcube": 2000},
        "reward_mode": "normalized_dense"}
QUICK = {**FULL, "steps": 10_000, "eval_every": 2500, "eval_episodes": 10, "final_episodes": 20}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    print("[bench]", " ".join(cmd), flush=True)
    with log.open("w") as f:
        subprocess.run(["nice", "-n", "15", *cmd], check=True, cwd=REPO_ROOT, stdout=f,
                       stderr=subprocess.STDOUT, env=_env())


def _log(run: Path) -> Path:
    """``run``'s log beside it (not ``with_suffix``: a run name such as ``...target_kl0.05_seed0`` has a dot,
    and every seed's log would be the same ``...target_kl0.log``)."""
    return run.parent / f"{run.name}.log"


def teacher(task: str, work: Path, given: str | None, budget: dict) -> tuple[Path, dict]:
    """The imperfect teacher's checkpoint and its unseen-seed report (trained here unless given)."""
    if given:
        ckpt = Path(given)
        rep = ckpt.parent / "report.json"
        return ckpt, json.loads(rep.read_text()) if rep.exists() else {}
    steps = budget["teacher_steps"][task]
    tag = "" if steps == 2000 else f"_{steps}steps"  # 2000: the name the first teachers were saved under
    run = work / "teachers" / f"{task}_{budget['teacher_demos'][task]}demos{tag}"
    if not (run / "report.json").exists():
        _run([sys.executable, "-m", "embodied_distill.train", f"task={task}", "student=mlp",
              f"demos.n_episodes={budget['teacher_demos'][task]}", f"distill.steps={steps}",
              "torch_threads=1", "device=cpu", "eval.episodes=50", "eval.video_episodes=0",
              f"hydra.run.dir={run}"], _log(run))
    return run / "checkpoint", json.loads((run / "report.json").read_text())


def rpd_overrides(budget: dict, task: str) -> list[str]:
    """The ``--rpd`` overrides that apply to ``task``: ``KEY=VALUE`` (every task) or ``TASK:KEY=VALUE``."""
    return scoped_overrides(budget.get("rpd_overrides", []), task)


def run_dir(work: Path, task: str, method: str, seed: int, budget: dict) -> Path:
    """``work/task/METHOD_seedN``; RPD runs with overrides get them in the name (so PPO and residual runs
    are reused when only RPD's settings change)."""
    extra = rpd_overrides(budget, task) if method == "rpd" else []
    tag = "".join(f"-{kv.replace('=', '')}" for kv in extra)
    if method_steps(budget, method) != budget["steps"]:
        tag += f"-{method_steps(budget, method)}steps"
    return work / task / f"{method}{tag}_seed{seed}"


def method_steps(budget: dict, method: str) -> int:
    """A method's env-step budget: ``--ppo-steps`` / ``--rpd-steps`` / ``--residual-steps`` when given, else
    the common budget."""
    return int(budget.get(f"{method}_steps") or budget["steps"])


def check_teacher(run: Path, ckpt: Path) -> None:
    """A finished run is reused only if it was trained with this teacher (a changed teacher preset would
    otherwise silently mix runs of two teachers in one table)."""
    from omegaconf import OmegaConf

    hydra_cfg = run / ".hydra" / "config.yaml"
    used = OmegaConf.load(hydra_cfg).get("teacher", {}).get("path") if hydra_cfg.exists() else None
    if used is not None and Path(used).resolve() != ckpt.resolve():
        raise SystemExit(f"{run} was trained with the teacher {used}, not {ckpt}: delete the run or choose "
                         "another --name")


def _parent(run: Path, common: Path) -> Path | None:
    """The finished run that ``run`` continued from: the one its ``continued_from`` file names, else (runs
    made before that file existed) the common-budget run; None for the common-budget run itself."""
    link = run / "continued_from"
    if link.exists():  # empty: a longer run that found nothing to continue and started fresh
        text = link.read_text().strip()
        return Path(text) if text else None
    return common if run != common and (common / "report.json").exists() else None


def _longest_shorter(common: Path, common_steps: int, seed: int, steps: int) -> Path | None:
    """The longest finished run beside ``common`` (the common-budget run of one task, method, seed and RPD
    overrides, ``common_steps`` long) with fewer than ``steps`` env steps and a training state to continue
    from; None when there is none."""
    found = [(common_steps, common)] if common_steps < steps else []
    stem = common.name[: -len(f"_seed{seed}")]
    for d in common.parent.glob(f"{stem}-*steps_seed{seed}"):
        n = d.name[len(stem) + 1: -len(f"steps_seed{seed}")]
        if n.isdigit() and int(n) < steps:
            found.append((int(n), d))
    found = [(n, d) for n, d in found if (d / "report.json").exists() and (d / "train_state").is_dir()]
    return max(found)[1] if found else None


def train_run(task: str, method: str, seed: int, ckpt: Path, work: Path, budget: dict) -> dict:
    run = run_dir(work, task, method, seed, budget)
    steps = method_steps(budget, method)
    common = run_dir(work, task, method, seed, {**budget, f"{method}_steps": None})
    if not (run / "report.json").exists():
        # a longer run continues the longest finished shorter run of the same method and seed (its atomic
        # training state: weights, optimiser, obs statistics, RPD's replay, RNG), exactly as a crash resume
        # would, instead of redoing it; ``continued_from`` records which, for the curve below
        base = _longest_shorter(common, budget["steps"], seed, steps)
        cont = base is not None
        if cont and not (run / "train_state").exists():
            shutil.copytree(base / "train_state", run / "train_state")
        run.mkdir(parents=True, exist_ok=True)
        (run / "continued_from").write_text(str(base) if cont else "")
        distill = "residual_rl" if method == "residual_rl" else "rpd"
        teach = ["teacher=none"] if method == "ppo" else ["teacher=checkpoint", f"teacher.path={ckpt}"]
        extra = [f"distill.{kv}" for kv in rpd_overrides(budget, task)] if method == "rpd" else []
        _run([sys.executable, "-m", "embodied_distill.train", f"task={task}", f"distill={distill}", *teach,
              *extra, f"task.reward_mode={budget['reward_mode']}",
              f"seed={seed}", f"distill.total_steps={steps}",
              f"distill.eval_every={budget['eval_every']}",
              f"distill.eval_episodes={budget['eval_episodes']}", f"eval.episodes={budget['final_episodes']}",
              "eval.num_envs=1", "eval.video_episodes=0", "torch_threads=1", "device=cpu",
              f"resume={str(cont).lower()}", f"hydra.run.dir={run}"], _log(run))
    if method != "ppo":
        check_teacher(run, ckpt)
    rep = json.loads((run / "report.json").read_text())
    if int(rep["env_steps"]) != steps:
        raise SystemExit(f"{run} holds a {rep['env_steps']}-step run, not {steps}: a finished run is "
                         "reused only at its own budget (another --name, or --ppo-steps / --rpd-steps)")
    # the whole curve and training time along the chain of continuations (states saved before the curve
    # travelled with them hold only their own part of it)
    chain, cur = [], run
    while cur is not None:
        chain.insert(0, json.loads((cur / "report.json").read_text()))
        cur = _parent(cur, common)
    curve: list[dict] = []
    for r in chain:
        curve += [p for p in r["curve"] if not curve or p["env_steps"] > curve[-1]["env_steps"]]
    reach = next((p["env_steps"] for p in curve if p["eval_success"] >= TARGET), None)
    return {"task": task, "method": method, "seed": seed, "final_success": rep["success_rate"],
            "final_episodes": rep["episodes"], "final_return": rep["mean_return"], "steps_to_0.8": reach,
            "env_steps": rep["env_steps"], "train_wall_s": sum(r["train_wall_s"] for r in chain),
            "curve": curve, "run_dir": str(run)}


def summarize(runs: list[dict], teachers: dict, budget: dict) -> tuple[list[dict], str]:
    rows, lines = [], []
    lines.append(f"| task | method | seeds | final success (mean ± std) | env steps to {TARGET} (per seed) | "
                 "teacher success | train wall (s/run) |")
    lines.append("|---|---|---|---|---|---|---|")
    for task in dict.fromkeys(r["task"] for r in runs):
        for method in METHODS:
            rs = [r for r in runs if r["task"] == task and r["method"] == method]
            if not rs:
                continue
            fin = np.array([r["final_success"] for r in rs])
            reach = [r["steps_to_0.8"] for r in rs]
            row = {"task": task, "method": method, "seeds": [r["seed"] for r in rs],
                   "final_success_mean": float(fin.mean()), "final_success_std": float(fin.std()),
                   "steps_to_0.8": reach, "teacher_success": teachers[task]["success_rate"],
                   "train_wall_s_mean": float(np.mean([r["train_wall_s"] for r in rs]))}
            rows.append(row)
            reach_s = ", ".join(str(x) if x is not None else f"not within {method_steps(budget, method)}"
                               for x in reach)
            lines.append(f"| {task} | {method} | {len(rs)} | {fin.mean():.2f} ± {fin.std():.2f} | "
                         f"{reach_s} | {teachers[task]['success_rate']:.2f} | "
                         f"{row['train_wall_s_mean']:.0f} |")
    return rows, "\n".join(lines)


def targets(rows: list[dict], budget: dict) -> dict:
    """The issue's targets per task: RPD reaches 0.8 in <= 1/3 of PPO's env steps; RPD final > teacher."""
    out = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        by = {r["method"]: r for r in rows if r["task"] == task}
        if "rpd" not in by:
            continue
        rpd = by["rpd"]
        res = {"rpd_beats_teacher": rpd["final_success_mean"] > rpd["teacher_success"],
               "rpd_final_vs_teacher": f"{rpd['final_success_mean']:.2f} vs {rpd['teacher_success']:.2f}"}
        if "ppo" in by:
            reach_r, reach_p = rpd["steps_to_0.8"], by["ppo"]["steps_to_0.8"]
            if any(x is None for x in reach_r):
                res["rpd_3x_faster_than_ppo"] = "undecided: RPD did not reach 0.8 in every seed within budget"
            else:
                # a PPO seed that never reached 0.8 counts as the budget: a lower bound on PPO's mean
                ppo_budget = method_steps(budget, "ppo")
                ppo_bound = float(np.mean([x if x is not None else ppo_budget for x in reach_p]))
                exact = all(x is not None for x in reach_p)
                ratio = ppo_bound / max(float(np.mean(reach_r)), 1.0)
                ok = ratio >= 3.0
                res["rpd_3x_faster_than_ppo"] = ok if exact or ok else \
                    "undecided: PPO did not reach 0.8 in every seed within budget"
                ppo_s = f"mean {ppo_bound:.0f}" if exact else f"at least {ppo_bound:.0f}"
                res["ppo_over_rpd_steps_to_0.8"] = f"{'' if exact else '>= '}{ratio:.2f}x " \
                    f"(RPD mean {np.mean(reach_r):.0f}, PPO {ppo_s})"
        out[task] = res
    return out


def plot(runs: list[dict], teachers: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in runs))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for method in METHODS:
            rs = [r for r in runs if r["task"] == task and r["method"] == method]
            if not rs:
                continue
            n = min(len(r["curve"]) for r in rs)
            x = np.array([p["env_steps"] for p in rs[0]["curve"][:n]])
            y = np.array([[p["eval_success"] for p in r["curve"][:n]] for r in rs])
            ax.plot(x, y.mean(0), marker="o", label=f"{method} ({len(rs)} seeds)")
            if len(rs) > 1:
                ax.fill_between(x, y.min(0), y.max(0), alpha=0.2)
        ax.axhline(teachers[task]["success_rate"], color="gray", ls="--", label="teacher (BC)")
        ax.axhline(TARGET, color="k", ls=":", lw=0.8)
        ax.set(title=task, xlabel="env steps", ylabel="success (held-out seeds)", ylim=(-0.02, 1.02))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="PickCube, seed 0, 10k env steps per run")
    ap.add_argument("--tasks", nargs="+", default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps", type=int, default=None, help="env steps per run (overrides the preset)")
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--reward-mode", default=None, choices=REWARD_MODES,
                    help="ManiSkill reward for every RL run (default normalized_dense)")
    ap.add_argument("--rpd", nargs="*", default=[], metavar="KEY=VALUE",
                    help="distill.KEY=VALUE overrides for the RPD runs only (e.g. distill_loss=bc_nll); "
                         "TASK:KEY=VALUE for one task")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each single-threaded)")
    ap.add_argument("--ppo-steps", type=int, default=None,
                    help="a longer budget for PPO alone (continues the longest shorter finished run), to "
                         "bound PPO's steps to 0.8 when it does not get there within the common budget")
    ap.add_argument("--rpd-steps", type=int, default=None,
                    help="a longer budget for RPD alone (continues the longest shorter finished run), "
                         "e.g. to see whether it passes its teacher given more steps")
    ap.add_argument("--residual-steps", type=int, default=None,
                    help="a longer budget for residual RL alone (continues the longest shorter finished run)")
    ap.add_argument("--teacher-pickcube", default=None, help="teacher checkpoint dir (else trained here)")
    ap.add_argument("--teacher-pushcube", default=None)
    ap.add_argument("--stop-after-s", type=float, default=None, help="start no new run after this many s")
    ap.add_argument("--name", default=None, help="results name (default rpd_vs_ppo[_quick])")
    ap.add_argument("--note", default="", help="a line for the Markdown header (e.g. why a run is partial)")
    ap.add_argument("--work", default=str(REPO_ROOT / "outputs" / "benchmarks" / "rpd_vs_ppo"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    budget = dict(QUICK if args.quick else FULL)
    if args.steps:
        budget["steps"] = args.steps
    if args.eval_every:
        budget["eval_every"] = args.eval_every
    if args.reward_mode:
        budget["reward_mode"] = args.reward_mode
    budget["rpd_overrides"] = list(args.rpd)
    budget["ppo_steps"] = args.ppo_steps
    budget["rpd_steps"] = args.rpd_steps
    budget["residual_rl_steps"] = args.residual_steps
    name = args.name or ("rpd_vs_ppo_quick" if args.quick else "rpd_vs_ppo")
    tasks = args.tasks or (["pickcube"] if args.quick else ["pickcube", "pushcube"])
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    work = Path(args.work)  # teachers are shared by name; the runs live under work / name
    t0 = time.perf_counter()
    teachers, runs, missing = {}, [], []
    for task in tasks:
        ckpt, rep = teacher(task, work, getattr(args, f"teacher_{task}", None), budget)
        teachers[task] = {"checkpoint": str(ckpt), "success_rate": rep.get("success_rate", float("nan")),
                          "episodes": rep.get("episodes"), "demo_episodes": rep.get("demo_episodes")}
        print(f"[bench] {task} teacher success {teachers[task]['success_rate']:.2f} "
              f"({teachers[task]['episodes']} unseen seeds)", flush=True)
    def one(key: tuple[int, str, str]) -> dict | None:
        seed, task, method = key
        done = (run_dir(work / name, task, method, seed, budget) / "report.json").exists()
        if not done and args.stop_after_s is not None and time.perf_counter() - t0 > args.stop_after_s:
            missing.append(f"{task}/{method}/seed{seed}")
            return None
        r = train_run(task, method, seed, Path(teachers[task]["checkpoint"]), work / name, budget)
        print(f"[bench] {task} {method} seed {seed}: final {r['final_success']:.2f}, "
              f"0.8 at {r['steps_to_0.8']}, {r['train_wall_s']:.0f} s", flush=True)
        return r

    # seed-major, so a cut-short benchmark still compares every method
    keys = [(seed, task, method) for seed in seeds for task in tasks for method in args.methods]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        runs = [r for r in pool.map(one, keys) if r is not None]
    rows, table = summarize(runs, teachers, budget)
    tgt = targets(rows, budget)
    out = Path(args.out) if args.out else REPO_ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    if runs:
        plot(runs, teachers, out / f"{name}.png")
    wall = time.perf_counter() - t0
    train_min = sum(r["train_wall_s"] for r in runs) / 60
    demos = ", ".join(f"{budget['teacher_demos'][t]} {t} demos ({budget['teacher_steps'][t]} steps)"
                      for t in tasks)
    longer = [f"{m}: {budget[f'{m}_steps']}" for m in METHODS if budget.get(f"{m}_steps")]
    ppo_note = f" ({', '.join(longer)}, continuing the {budget['steps']}-step runs)" if longer else ""
    head = (f"## {name}{' (PARTIAL: missing ' + ', '.join(missing) + ')' if missing else ''}\n\n"
            f"Budget per run: {budget['steps']} env steps{ppo_note}, reward `{budget['reward_mode']}` "
            "(1 CPU env, PPO rollouts of 500 steps, 10 epochs, minibatch 50, gamma 0.8: "
            f"configs/distill/rpd.yaml; RPD overrides: {' '.join(budget['rpd_overrides']) or 'none'}), "
            f"curve every {budget['eval_every']} steps on {budget['eval_episodes']} held-out seeds, final "
            f"success on {budget['final_episodes']} unseen seeds. Teacher: MLP BC on {demos}. "
            f"Wall time: this invocation {wall / 60:.1f} min ({args.jobs} runs at a time), the runs' "
            f"training {train_min:.1f} min (plus evaluation).\n\n")
    if args.note:
        head += f"**Note:** {args.note}\n\n"
    tgt_md = "\n".join(f"- **{task}**: " + "; ".join(f"{k} = {v}" for k, v in res.items())
                       for task, res in tgt.items())
    md = head + table + "\n\nTargets (RPD reaches 0.8 in <= 1/3 of PPO's env steps; RPD's final success " \
        f"exceeds the teacher's):\n{tgt_md}\n\n![curves]({name}.png)\n"
    write_results(name, {"budget": budget, "tasks": tasks, "seeds": seeds, "methods": args.methods,
                         "teachers": teachers, "rows": rows, "targets": tgt, "runs": runs,
                         "partial": bool(missing), "missing_runs": missing, "note": args.note,
                         "wall_s": wall}, md, out)
    print(md)


if __name__ == "__main__":
    main()
