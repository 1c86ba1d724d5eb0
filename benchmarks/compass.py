"""COMPASS across embodiments: IL base vs residual-RL specialists vs the distilled generalist.

    python benchmarks/compass.py [--task pickcube|pointnav] [--quick]
                                 [--stage all|base|specialists|generalist|evaluate]
                                 [--only NAME ...] [--out DIR] [--demos ROBOT=N ...] [--name NAME]
                                 [--results-name NAME]
                                 [--specialist-steps N] [--dagger-rounds K] [--episodes N] [--seed S]
                                 [--base-dagger ROBOT=K ...]
                                 [--std-per-embodiment | --global-std] [--override KEY=VALUE ...]

Runs ``embodied_distill/distill/compass.py`` with the budgets below, in ``outputs/benchmarks/<name>``
(default ``compass[_quick]``, ``compass_pointnav[_quick]``). ``--task pickcube`` (default): the
``configs/distill/compass.yaml`` embodiments, panda with pd_ee_delta_pose and its scripted expert, so100 with
pd_joint_pos and its joint-space scripted expert in sim/so100_expert.py. ``--task pointnav``: the
``configs/distill/compass_nav.yaml`` embodiments, a differential-drive and a holonomic base on MuJoCo
point-goal navigation (sim/navigation.py), COMPASS's mobility setting. ``--demos panda=15`` replaces a
robot's demo count (a weaker IL base leaves room for the 2x target); ``--base-dagger so100=3`` adds
DAgger rounds to a robot's IL base. Every stage resumes from what is already there, so on a shared CPU
run it in pieces (``--stage base``, ``--stage specialists --only panda``, ..., ``--stage evaluate``; the
two specialists may run at once);
the wall time of every piece is accumulated in ``stage_times.json``. Success (the env's success flag
at the last step of a full episode) of the IL base, each specialist and the generalist is measured on
the same ``episodes`` unseen seeds (100000+) per embodiment. Targets (issue 8): generalist >= 90% of
each specialist on its own robot, and >= 2x the IL base's mean success.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, write_results  # noqa: E402

FULL = {
    "demos": 100,
    "base_steps": 15000,
    "specialist_steps": 30_000,
    "critic_warmup_steps": 5000,
    "specialist_eval_every": 10_000,  # validations for keep_best (configs/distill/compass.yaml)
    "data_episodes": 50,
    # 3 rounds (was 1): on the default run the panda generalist went 0.84 -> 0.96 (its specialist: 0.96)
    "dagger_rounds": 3,
    "dagger_episodes": 20,
    "epochs": 100,
    # 200 (was 50): the so100's rates are ~0.1, where 50 episodes give a standard error of ~0.04, as large
    # as the differences between its base, specialist and generalist
    "episodes": 200,
    # run 1 (results committed in 25b86b3): generalist from scratch on 50 specialist episodes per robot
    # reached 0.48 on panda vs the specialist's 0.66; run 2 changes only this: it starts from the IL base
    "generalist_from_base": True,
}
QUICK = {
    "demos": 20,
    "base_steps": 1000,
    "specialist_steps": 2000,
    "critic_warmup_steps": 500,
    "specialist_eval_every": 1000,
    "data_episodes": 5,
    "dagger_rounds": 1,
    "dagger_episodes": 2,
    "epochs": 20,
    "episodes": 10,
    "generalist_from_base": True,
}
# point-goal navigation: the envs run at ~1300 steps/s, so the specialists get 10x PickCube's steps; a
# 5-demo base leaves room for residual RL (bases 0.07 / 0.23 on 200 seeds; 10 demos: 0.34 / 0.67, a mean
# of 0.51 that no generalist can double; compass_pointnav_demos10.md)
NAV = {**FULL, "demos": 5, "base_steps": 5000, "specialist_steps": 300_000, "critic_warmup_steps": 10_000,
       "specialist_eval_every": 20_000}  # generalist stage and evaluation as PickCube's
NAV_QUICK = {**QUICK, "base_steps": 500, "specialist_steps": 4000, "specialist_eval_every": 2000,
             "critic_warmup_steps": 1000}
TASKS = {  # task -> (hydra overrides, full preset, quick preset, what the table calls it)
    "pickcube": (("task=pickcube", "distill=compass"), FULL, QUICK, "PickCube-v1 (state obs, CPU)"),
    "pointnav": (("sim=navigation", "task=pointnav", "distill=compass_nav"), NAV, NAV_QUICK,
                 "Point-goal navigation on MuJoCo (sim/navigation.py: 4 x 4 m arena, 3 box obstacles, "
                 "goal 2.0-3.2 m away, success within 0.2 m)"),
}
STAGES = ("base", "specialists", "generalist", "evaluate")


def compose(preset: dict, stages: list[str], only: list[str], run_dir: Path, seed: int = 0,
            extra: tuple[str, ...] = (), task: str = "pickcube"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    overrides = [
        *TASKS[task][0],
        f"hydra.run.dir={run_dir}",
        "device=cpu",
        f"seed={seed}",
        "torch_threads=1",
        f"demos.dir={REPO_ROOT / 'data' / 'demos'}",
        f"distill.stages=[{','.join(stages)}]",
        f"distill.only=[{','.join(only)}]",
        f"distill.demos_per_embodiment={preset['demos']}",
        f"distill.base_steps={preset['base_steps']}",
        f"distill.specialist.total_steps={preset['specialist_steps']}",
        f"distill.specialist.eval_every={preset['specialist_eval_every']}",
        f"distill.specialist.critic_warmup_steps={preset['critic_warmup_steps']}",
        f"distill.data_episodes={preset['data_episodes']}",
        f"distill.dagger_rounds={preset['dagger_rounds']}",
        f"distill.dagger_episodes={preset['dagger_episodes']}",
        f"distill.epochs={preset['epochs']}",
        f"distill.init_generalist_from_base={preset['generalist_from_base']}",
        f"eval.episodes={preset['episodes']}",
        "eval.num_envs=2",
        "eval.video_episodes=0",
        *extra,
    ]
    with initialize_config_module(config_module="embodied_distill.configs", version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides), overrides


def add_stage_time(path: Path, key: str, seconds: float) -> dict[str, float]:
    """Add ``seconds`` to ``key`` in the ``stage_times.json`` at ``path`` and return all of them. Read,
    update and write happen under an exclusive lock, so pieces that run at once (two specialists) keep
    each other's times."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        times = json.loads(path.read_text()) if path.exists() else {}
        times[key] = times.get(key, 0.0) + seconds
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(times, indent=2))
        tmp.replace(path)
    return times


def ratio_intervals(successes: dict[str, dict[str, list[bool]]], resamples: int = 2000,
                    seed: int = 0) -> dict[str, list[float] | None]:
    """95% paired-bootstrap intervals of the two target ratios from per-episode successes
    (``successes[robot][who]``: one bool per evaluation seed, the same seeds for base / specialist /
    generalist of a robot). Each resample draws the seeds of every robot with replacement, the same draws
    for all three policies of that robot (they ran on the same seeds, so their differences are paired),
    independently per robot. Returns ``{"<robot>": [lo, hi]}`` for generalist / specialist and
    ``{"mean": [lo, hi]}`` for mean generalist / mean base success; ``None`` where a resampled
    denominator is 0 in more than 2.5% of the draws (the interval would be unbounded)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rates: dict[str, dict[str, np.ndarray]] = {}
    for robot, per in successes.items():
        counts = {len(v) for v in per.values()}
        if len(counts) != 1:
            raise ValueError(f"{robot}: base / specialist / generalist ran on different numbers of seeds "
                             f"{counts}")
        n = counts.pop()
        idx = rng.integers(0, n, size=(resamples, n))
        rates[robot] = {who: np.asarray(v, np.float64)[idx].mean(1) for who, v in per.items()}

    def interval(num: np.ndarray, den: np.ndarray) -> list[float] | None:
        if np.mean(den == 0) > 0.025:
            return None
        ratio = num[den > 0] / den[den > 0]
        return [float(np.percentile(ratio, 2.5)), float(np.percentile(ratio, 97.5))]

    out = {robot: interval(r["generalist"], r["specialist"]) for robot, r in rates.items()
           if {"generalist", "specialist"} <= r.keys()}
    if all({"generalist", "base"} <= r.keys() for r in rates.values()):
        out["mean"] = interval(np.mean([r["generalist"] for r in rates.values()], 0),
                               np.mean([r["base"] for r in rates.values()], 0))
    return out


def episode_successes(run_dir: Path, report: dict, seeds: list[int]) -> dict[str, dict[str, list[bool]]]:
    """Per-episode success flags of every policy in the report (``run_dir/eval/<who>_<robot>.json``,
    written by the evaluate stage), ordered by seed; only evaluations on exactly ``seeds``."""
    out: dict[str, dict[str, list[bool]]] = {}
    for robot, per in report["per_embodiment"].items():
        for who in per:
            path = run_dir / "eval" / f"{who}_{robot}.json"
            if not path.exists():
                continue
            rep = json.loads(path.read_text())
            if rep.get("seeds") != seeds:
                continue
            eps = sorted(rep["per_episode"], key=lambda e: e["seed"])
            out.setdefault(robot, {})[who] = [bool(e["success"]) for e in eps]
    return out


def table(report: dict, times: dict, preset: dict, name: str, demos_cfg, default_scale: float,
          std_per_robot: bool, keep_best: bool, task: str = "pickcube", num_envs: int = 1,
          ppo: str = "", confirm_episodes: int = 0, note: str = "", intervals: dict | None = None) -> str:
    from embodied_distill.distill.compass import Embodiment

    rows = report["per_embodiment"]
    keep_best_text = ("; kept: the best of validations at the start and every "
                      f"{preset['specialist_eval_every']} steps" if keep_best else "")
    if keep_best and confirm_episodes:
        keep_best_text += (f", if not the last then the better of it and the last on {confirm_episodes} "
                           "fresh seeds")
    if keep_best:
        keep_best_text += ", step in brackets"
    emb = {e["name"]: e for e in report["embodiments"]}
    # the specialists' own training steps where their reports give them (a run may train one robot longer)
    steps = {n: r["specialist"].get("env_steps", preset["specialist_steps"]) for n, r in rows.items()
             if "specialist" in r}
    steps_text = (f"{preset['specialist_steps']} env steps each"
                  if set(steps.values()) <= {preset["specialist_steps"]}
                  else "env steps " + ", ".join(f"{n} {v}" for n, v in steps.items()))

    def cell(r, who):
        if who not in r:
            return "—"
        picked, err = r[who].get("selected_step"), r[who].get("success_stderr")
        return (f"{r[who]['success_rate']:.2f}" + (f" ± {err:.2f}" if err is not None else "")
                + (f" (step {picked})" if picked is not None else ""))

    ppo_text = f"; {ppo}" if ppo else ""
    lines = [
        f"## {name}",
        "",
        f"{TASKS[task][3]}, success at the end of a full episode on {preset['episodes']} unseen "
        f"seeds per embodiment. IL base: one embodiment-conditioned MLP, BC on the demos listed per robot "
        f"({preset['base_steps']} steps). Specialists: residual PPO on the frozen base, "
        f"{steps_text} ({num_envs} CPU env{'s' if num_envs > 1 else ''}, "
        "the first "
        f"{preset.get('critic_warmup_steps', 0)} of them value-only: critic warm-up"
        f"{ppo_text}{keep_best_text}). Generalist "
        f"({'initialised from the IL base' if preset['generalist_from_base'] else 'from scratch'}, "
        f"{'one learnable std per robot' if std_per_robot else 'one global learnable std'}): "
        "KL(specialist || generalist) "
        f"on {preset['data_episodes']} specialist episodes per robot + {preset['dagger_rounds']} DAgger "
        f"round(s) of {preset['dagger_episodes']} generalist episodes, {preset['epochs']} epochs per fit.",
        "",
        "| embodiment | control | demos (expert, DART noise std x prob) | episode limit | residual scale "
        "| IL base | specialist | generalist | generalist / specialist |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    intervals = intervals or {}

    def ci(key: str) -> str:
        return f" [{intervals[key][0]:.2f}, {intervals[key][1]:.2f}]" if intervals.get(key) else ""

    for name, r in rows.items():
        ratio = (
            f"{r['generalist']['success_rate'] / r['specialist']['success_rate']:.2f}{ci(name)}"
            if "generalist" in r and "specialist" in r and r["specialist"]["success_rate"] > 0
            else "—"
        )
        e = emb[name]
        robot = Embodiment(**e)  # the same fallbacks the base stage used
        n_demos, (std, prob) = robot.demo_count(preset["demos"]), robot.demo_noise(demos_cfg)
        lines.append(
            f"| {name} | {e['control_mode']} | {n_demos} ({e['expert']}, {std} x {prob})"
            + (f" + {robot.base_dagger_rounds} DAgger rounds x {robot.base_dagger_episodes} episodes"
               if robot.base_dagger_rounds else "") + " | "
            f"{e['max_episode_steps']} | {robot.residual_scale or default_scale} | "
            f"{cell(r, 'base')} | {cell(r, 'specialist')} | {cell(r, 'generalist')} | {ratio} |"
        )
    m = report.get("mean_success", {})
    times_base = (f"{m['generalist'] / m['base']:.2f}x the base{ci('mean')}"
                  if m.get("base") and "generalist" in m else "")
    lines.append(
        f"| **mean** | | | | | {m.get('base', float('nan')):.2f} | {m.get('specialist', float('nan')):.2f} "
        f"| {m.get('generalist', float('nan')):.2f} | {times_base} |"
    )
    once = "; ".join(
        f"{name} " + " / ".join(f"{r[w]['success_once_rate']:.2f}" if "success_once_rate" in r.get(w, {})
                                else "—" for w in ("base", "specialist", "generalist"))
        for name, r in rows.items())
    lines += [
        "",
        "Success at any step instead of at the end (success_once; base / specialist / generalist): "
        f"{once}." + (" The gap is the episodes where the cube reached the goal with the arm still but the "
                      "episode did not end that way." if task == "pickcube" else ""),
        "",
        f"Targets: {json.dumps(report.get('targets', {}))}",
        "",
    ]
    if intervals:
        lines += [
            "In brackets: 95% paired-bootstrap intervals of the ratios (2000 resamples of the evaluation "
            "seeds, the same draws for a robot's three policies).",
            "",
        ]
    lines += [
        "Wall time per stage (s, summed over the pieces that ran it): "
        + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
        + f"; total {sum(times.values()) / 60:.1f} min.",
    ]
    if note:
        lines += ["", f"Note: {note}"]
    if report.get("missing"):
        lines.append(f"\n**Not yet trained / evaluated:** {report['missing']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="pickcube", choices=sorted(TASKS),
                    help="pickcube (panda + so100) or pointnav (differential-drive + holonomic base)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets (a few minutes)")
    ap.add_argument("--stage", default="all", choices=("all", *STAGES))
    ap.add_argument("--only", nargs="*", default=[], help="specialists stage: only these embodiments")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--demos", nargs="*", default=[], metavar="ROBOT=N",
                    help="demo count per robot instead of the config's (e.g. panda=15: a weaker IL base)")
    ap.add_argument("--base-dagger", nargs="*", default=[], metavar="ROBOT=K",
                    help="K DAgger rounds for that robot's IL base (the scripted expert labels the states "
                         "the base reaches; distill.embodiments.*.base_dagger_rounds)")
    ap.add_argument("--name", default=None, help="results and run-dir name (default compass[_quick])")
    ap.add_argument("--results-name", default=None, metavar="NAME",
                    help="write the results as NAME.json / NAME.md instead of under --name (e.g. the same "
                         "run evaluated on more --episodes, beside its earlier table)")
    ap.add_argument("--specialist-steps", type=int, default=None, metavar="N",
                    help="env steps per residual-RL specialist instead of the preset's (pickcube 30000, "
                         "pointnav 300000)")
    ap.add_argument("--dagger-rounds", type=int, default=None, metavar="K",
                    help="generalist DAgger rounds instead of the preset's (3)")
    std = ap.add_mutually_exclusive_group()
    std.add_argument("--std-per-embodiment", action="store_true",
                     help="generalist with one learnable std per robot (the config's default)")
    std.add_argument("--global-std", action="store_true",
                     help="generalist with COMPASS's single global learnable std")
    ap.add_argument("--episodes", type=int, default=None, metavar="N",
                    help="evaluation episodes per policy and robot instead of the preset's (200)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (base, specialists, generalist); the "
                    "evaluation seeds stay fixed")
    ap.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra Hydra overrides after the preset's (e.g. distill.specialist.n_steps=2000); "
                         "they are recorded in the results")
    ap.add_argument("--note", default="", help="a sentence added under the table (e.g. how a run was resumed "
                    "with other settings); it is stored in the JSON too")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from embodied_distill.distill import compass
    from embodied_distill.train import make_runner, quiet

    quiet()
    preset = dict(TASKS[args.task][2] if args.quick else TASKS[args.task][1])
    if args.specialist_steps is not None:
        if args.specialist_steps <= preset["critic_warmup_steps"]:
            ap.error(f"--specialist-steps must exceed the critic warm-up ({preset['critic_warmup_steps']})")
        preset["specialist_steps"] = args.specialist_steps
    if args.dagger_rounds is not None:
        if args.dagger_rounds < 0:
            ap.error("--dagger-rounds must be >= 0")
        preset["dagger_rounds"] = args.dagger_rounds
    if args.episodes is not None:
        if args.episodes < 1:
            ap.error("--episodes must be >= 1")
        preset["episodes"] = args.episodes
    name = args.name or ("compass" + ("" if args.task == "pickcube" else f"_{args.task}")
                         + ("_quick" if args.quick else ""))
    run_dir = REPO_ROOT / "outputs" / "benchmarks" / name
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    extra = ("distill.policy.std_per_embodiment=true",) if args.std_per_embodiment else \
        ("distill.policy.std_per_embodiment=false",) if args.global_std else ()
    extra += tuple(args.override)
    cfg, overrides = compose(preset, stages, args.only, run_dir, args.seed, extra, args.task)
    spec = cfg.distill.specialist  # as composed: --override may change what the preset set (table text too)
    preset.update(specialist_steps=int(spec.total_steps), specialist_eval_every=int(spec.eval_every),
                  critic_warmup_steps=int(spec.critic_warmup_steps),
                  **{k: int(cfg.distill[k]) for k in ("data_episodes", "dagger_rounds", "dagger_episodes",
                                                      "epochs")})
    ppo = (f"rollouts of {spec.n_steps} steps, minibatches of {spec.batch_size}, lr {spec.lr}, "
           f"gamma {spec.gamma}, GAE lambda {spec.gae_lambda}, initial log std {spec.log_std_init}")
    demos = dict(item.split("=", 1) for item in args.demos)
    from omegaconf import open_dict

    dagger = dict(item.split("=", 1) for item in args.base_dagger)
    with open_dict(cfg):
        for emb in cfg.distill.embodiments:  # per-robot demo counts and DAgger rounds (the base stage)
            if emb.name in demos:
                emb.demos = int(demos.pop(emb.name))
            if emb.name in dagger:
                emb.base_dagger_rounds = int(dagger.pop(emb.name))
    if demos or dagger:
        ap.error(f"--demos / --base-dagger name unknown robots {sorted({**demos, **dagger})}")
    overrides += [f"--demos {item}" for item in args.demos] + [f"--base-dagger {i}" for i in args.base_dagger]
    run_dir.mkdir(parents=True, exist_ok=True)
    times_path = run_dir / "stage_times.json"
    t0 = time.perf_counter()
    torch.manual_seed(int(cfg.seed))
    compass.run(cfg, run_dir, make_runner(cfg), torch.device("cpu"))
    key = args.stage + (f"[{','.join(args.only)}]" if args.only else "")
    times = add_stage_time(times_path, key, time.perf_counter() - t0)
    if "evaluate" not in stages:
        print(f"[bench] stage {key} done in {time.perf_counter() - t0:.0f} s")
        return
    report = json.loads((run_dir / "report.json").read_text())
    seeds = list(range(int(cfg.eval.seed_start), int(cfg.eval.seed_start) + preset["episodes"]))
    intervals = ratio_intervals(episode_successes(run_dir, report, seeds))
    results_name = args.results_name or name
    md = table(report, times, preset, results_name, cfg.demos, float(cfg.distill.specialist.residual_scale),
               bool(cfg.distill.policy.get("std_per_embodiment", False)),
               bool(cfg.distill.specialist.get("keep_best", False)), args.task,
               int(cfg.distill.specialist.num_envs), ppo,
               int(cfg.distill.specialist.get("keep_best_confirm_episodes", 0)), args.note, intervals)
    print(md)
    payload = {
        "task": args.task,
        "preset": preset,
        "quick": args.quick,
        "overrides": overrides,
        "note": args.note,
        "run_dir": str(run_dir),
        "stage_wall_s": times,
        "total_wall_s": sum(times.values()),
        "seeds": {
            "eval_seed_start": int(cfg.eval.seed_start),
            "episodes": preset["episodes"],
            "train_seed": int(cfg.seed),
        },
        **{k: report.get(k) for k in ("per_embodiment", "mean_success", "targets", "missing", "embodiments")},
        "ratio_intervals_95": intervals,
    }
    earlier = run_dir / "earlier_runs.json"  # results of earlier settings, kept beside the latest
    if earlier.exists():
        payload["earlier_runs"] = json.loads(earlier.read_text())
        md += "\n\nEarlier runs (same base and specialists): " + "; ".join(
            f"{r['label']}: generalist " + ", ".join(f"{e} {v:.2f}" for e, v in r["generalist"].items())
            for r in payload["earlier_runs"]
        )
    print(f"[bench] wrote {write_results(results_name, payload, md, args.out)}")


if __name__ == "__main__":
    main()
