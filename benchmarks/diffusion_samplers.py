"""One diffusion-policy checkpoint, five samplers, side by side on PickCube (or a LIBERO-style task).

    python benchmarks/diffusion_samplers.py [--checkpoint DIR] [--libero] [--quick] [--out DIR]

For each of ddpm-100, ddim-10, streaming (SDP buffer), rti (warm start) and consistency-1 (and -2):
success on fixed unseen seeds, network calls per executed action, and latency per action and per
chunk (batch 1, p50/p95), all in one process on the same checkpoint. Without ``--checkpoint`` it trains
one first with ``python -m embodied_distill.train student=diffusion`` (``--quick``: a tiny budget that
still exercises every sampler; its success figures mean nothing). ``--libero`` does the same on the
LIBERO-style ``libero_goal/put_red_cube_in_bowl`` (state observations, 200 demos, episodes end at the
first success) and writes ``diffusion_samplers_libero.*``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO_ROOT, write_results  # noqa: E402

SAMPLERS = {  # label -> (sampler, overrides)
    "ddpm-100": ("ddpm", {"num_inference_steps": 100}),
    "ddim-10": ("ddim", {"num_inference_steps": 10}),
    "streaming": ("streaming", {}),
    "rti": ("rti", {}),
    "rti-11": ("rti", {"rti_steps": [11, 0]}),  # RTI's low-noise warm start, for comparison
    "consistency-1": ("consistency", {"consistency_steps": 1}),
    "consistency-2": ("consistency", {"consistency_steps": 2}),
}

TRAIN_FULL = ["distill.steps=8000", "distill.batch_size=128", "distill.lr=5e-4", "torch_threads=1",
              "distill.consistency_steps=3000", "distill.checkpoint_every=500", "eval.episodes=50"]
TRAIN_QUICK = ["demos.n_episodes=30", "distill.steps=300", "distill.batch_size=64", "distill.lr=5e-4",
               "distill.consistency_steps=100", "eval.episodes=2", "eval.video_episodes=0"]


LIBERO = ["sim=libero", "task=libero_goal/put_red_cube_in_bowl", "demos.n_episodes=200", "distill.steps=8000",
          "distill.consistency_steps=3000", "eval.video_episodes=0"]


def train(run_dir: Path, quick: bool, libero: bool) -> Path:
    task = LIBERO if libero else ["task=pickcube"]
    extra = [*task, *TRAIN_QUICK] if quick else [*TRAIN_FULL, *task]  # later entries win
    cmd = [sys.executable, "-m", "embodied_distill.train", "student=diffusion", f"hydra.run.dir={run_dir}",
           *extra]
    print("[bench] training:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO_ROOT)
    return run_dir / "checkpoint"


def chunk_latency(policy, obs: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    """Wall time of predict_action_chunk at batch 1 after the episode-start call (ms)."""
    policy.reset()
    policy.predict_action_chunk(obs)  # streaming / rti warm-up happens here
    calls0 = policy.sampler.calls
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        policy.predict_action_chunk(obs)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms_per_chunk_p50": float(np.percentile(times, 50)),
            "ms_per_chunk_p95": float(np.percentile(times, 95)),
            "calls_per_chunk_steady": (policy.sampler.calls - calls0) / repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--libero", action="store_true", help="LIBERO-style libero_goal/put_red_cube_in_bowl")
    ap.add_argument("--episodes", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.time()

    from embodied_distill.policies.base import load_policy
    from omegaconf import OmegaConf

    from embodied_distill.train import make_runner

    name = "diffusion_samplers" + ("_libero" if args.libero else "") + ("_quick" if args.quick else "")
    run_dir = REPO_ROOT / "outputs" / name.replace("diffusion_samplers", "bench_diffusion")
    ckpt = args.checkpoint or train(run_dir, args.quick, args.libero)
    episodes = args.episodes or (4 if args.quick else 50)
    policy, cfg, meta = load_policy(ckpt)
    runner = make_runner(OmegaConf.create(cfg))
    task_name = cfg["task"]["name"]
    seed_start = int(cfg["eval"]["seed_start"])
    num_envs = 2
    rows, results = [], {}
    obs = {"state": torch.zeros(1, policy.config.obs_horizon, policy.config.obs_dim)}
    for label, (sampler, overrides) in SAMPLERS.items():
        policy.set_sampler(sampler, **overrides)
        lat = chunk_latency(policy, obs, repeats=5 if args.quick else 30)
        policy.set_sampler(sampler, **overrides)
        steps = [0]
        select = policy.select_action

        def counted(obs, _select=select, _steps=steps):  # one executed action per env and call
            _steps[0] += 1
            return _select(obs)

        policy.select_action = counted
        report = runner.evaluate(policy, episodes, seed_start, num_envs=num_envs)
        del policy.select_action
        actions = steps[0]
        res = {"sampler": sampler, "overrides": overrides, "success_rate": report["success_rate"],
               "success_stderr": report["success_stderr"], "episodes": report["episodes"],
               "network_calls_per_action": policy.sampler.calls / actions,
               "ms_per_action_p50": report["latency_ms_per_action_p50"],
               "ms_per_action_p95": report["latency_ms_per_action_p95"], **lat}
        results[label] = res
        print(f"[bench] {label}: {res}", flush=True)
    base = results["ddim-10"]
    ddpm = results["ddpm-100"]
    for label, r in results.items():
        r["calls_ratio_vs_ddim10"] = base["network_calls_per_action"] / max(r["network_calls_per_action"],
                                                                           1e-9)
        r["chunk_latency_ratio_vs_ddpm100"] = ddpm["ms_per_chunk_p50"] / max(r["ms_per_chunk_p50"], 1e-9)
        rows.append(f"| {label} | {r['success_rate']:.2f} +- {r['success_stderr']:.2f} | "
                    f"{r['network_calls_per_action']:.3f} | {r['calls_ratio_vs_ddim10']:.1f}x | "
                    f"{r['ms_per_action_p50']:.2f} / {r['ms_per_action_p95']:.2f} | "
                    f"{r['ms_per_chunk_p50']:.2f} / {r['ms_per_chunk_p95']:.2f} | "
                    f"{r['chunk_latency_ratio_vs_ddpm100']:.1f}x |")
    table = (f"| sampler | success ({episodes} unseen seeds) | network calls / action | "
             "fewer calls than ddim-10 | ms / action p50 / p95 (batch 2) | ms / chunk p50 / p95 (batch 1) | "
             "chunk speed-up vs ddpm-100 |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    def close(a: str, b: dict) -> bool:
        return abs(results[a]["success_rate"] - b["success_rate"]) <= 0.05

    targets = {
        "ddpm100_success_ge_0.8": ddpm["success_rate"] >= 0.8,
        "consistency1_within_5pts_of_ddpm100": close("consistency-1", ddpm),
        "consistency1_chunk_latency_50x_lower":
            results["consistency-1"]["chunk_latency_ratio_vs_ddpm100"] >= 50,
        "streaming_5x_fewer_calls_than_ddim10": results["streaming"]["calls_ratio_vs_ddim10"] >= 5,
        "streaming_within_5pts_of_ddim10": close("streaming", base),
        "rti_5x_fewer_calls_than_ddim10": results["rti"]["calls_ratio_vs_ddim10"] >= 5,
        "rti_within_5pts_of_ddim10": close("rti", base),
    }
    table += "\n\nTargets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets.items())
    payload = {"checkpoint": str(ckpt), "task": task_name, "episodes": episodes, "seed_start": seed_start,
               "seeds": list(range(seed_start, seed_start + episodes)), "quick": args.quick,
               "policy_config": policy.policy_config_dict(), "train_meta": meta, "results": results,
               "targets": targets, "wall_time_s": time.time() - t_start}
    out = write_results(name, payload, table, args.out)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for label, r in results.items():
            ax.scatter(r["ms_per_chunk_p50"], r["success_rate"])
            ax.annotate(label, (r["ms_per_chunk_p50"], r["success_rate"]))
        ax.set_xscale("log")
        ax.set_xlabel("ms per chunk (batch 1, CPU)")
        ax.set_ylabel("success rate")
        ax.set_title(f"{task_name}: one checkpoint, five samplers")
        fig.tight_layout()
        fig.savefig(Path(out).parent / f"{name}.png", dpi=120)
    except Exception as e:  # the table and JSON are what count
        print(f"[bench] plot skipped: {e!r}")
    print(table)


if __name__ == "__main__":
    main()
