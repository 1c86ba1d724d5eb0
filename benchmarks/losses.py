"""Time and peak memory of naive vs chunked vs hidden-state generalized JSD (forward + backward, CPU).

    python benchmarks/losses.py [--quick] [--out DIR]

Full run: 8 x 512 = 4096 tokens, vocabulary 49152 (SmolLM's), hidden size 576, beta = 0.5, float32.
``--quick``: 2 x 512 tokens, same vocabulary. Two scenarios:

* ``logits``: the student and teacher logits ``(N, V)`` are given (allocated before measuring);
  ``naive`` = :func:`generalized_jsd`, ``chunked`` = :func:`chunked_divergence`.
* ``hidden``: hidden states ``(N, H)`` and LM heads ``(V, H)`` are given; ``naive`` and ``chunked``
  first form both logits with a matmul, ``hidden-state`` = :func:`chunked_divergence_from_hidden`
  (logits exist one chunk at a time). Gradients flow to the student's hidden states and head.

Every variant runs in a fresh subprocess (so one variant's freed memory cannot hide another's peak).
Peak memory = peak resident set size during forward + backward minus the resident size once the inputs
exist (the kernel's peak counter is reset through ``/proc/self/clear_refs`` after allocating inputs;
without it, the ``ru_maxrss`` difference, which can under-count). Rounds
are interleaved across variants; the reported time is the fastest round (the machine is shared), all
rounds are in the JSON. Each variant also reports the loss and the gradient norm so the table shows
that they compute the same thing. Results: ``benchmarks/results/losses.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DEFAULT_OUT, reset_peak_rss, status_mib, write_results  # noqa: E402

SEED = 0
BETA = 0.5
VOCAB = 49152
HIDDEN = 576
FULL_TOKENS = (8, 512)
QUICK_TOKENS = (2, 512)
ROUNDS = 2
VARIANTS = [("logits", "naive"), ("logits", "chunked"), ("hidden", "naive"), ("hidden", "chunked"),
            ("hidden", "hidden-state")]  # fmt: skip


def run_worker(scenario: str, variant: str, tokens: int, vocab: int, hidden: int, seed: int) -> dict:
    """One measurement in this (fresh) process; returns the figures as a dict."""
    import torch

    from embodied_distill.losses import chunked_divergence, chunked_divergence_from_hidden, generalized_jsd

    def make_inputs(n: int, v: int):
        # In-place scaling: no transient copies, so nothing but the inputs is resident afterwards.
        gen = torch.Generator().manual_seed(seed)
        if scenario == "logits":
            student = torch.randn(n, v, generator=gen).mul_(2).requires_grad_()
            teacher = torch.randn(n, v, generator=gen).mul_(2)
            return [student], [teacher]
        scale = 2.0 / math.sqrt(hidden)
        h_s = torch.randn(n, hidden, generator=gen).requires_grad_()
        w_s = torch.randn(v, hidden, generator=gen).mul_(scale).requires_grad_()
        h_t = torch.randn(n, hidden, generator=gen)
        w_t = torch.randn(v, hidden, generator=gen).mul_(scale)
        return [h_s, w_s], [h_t, w_t]

    def loss_fn(grads, consts):
        if scenario == "logits":
            (s,), (t,) = grads, consts
        elif variant == "hidden-state":
            (h_s, w_s), (h_t, w_t) = grads, consts
            return chunked_divergence_from_hidden(h_s, w_s, teacher_hidden=h_t, teacher_weight=w_t, beta=BETA)
        else:
            (h_s, w_s), (h_t, w_t) = grads, consts
            s = h_s @ w_s.t()
            with torch.no_grad():
                t = h_t @ w_t.t()
        if variant == "naive":
            return generalized_jsd(s, t, beta=BETA)
        return chunked_divergence(s, t, beta=BETA)

    # Warm-up at a tiny size (loads kernels, thread pools) before the baseline is taken.
    g_small, c_small = make_inputs(8, 64)
    loss_fn(g_small, c_small).backward()
    del g_small, c_small

    grads, consts = make_inputs(tokens, vocab)
    gc.collect()
    reset = reset_peak_rss()
    baseline = status_mib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    loss = loss_fn(grads, consts)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    peak = status_mib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    grad_norm = math.sqrt(sum(float(x.grad.double().square().sum()) for x in grads))
    return {
        "scenario": scenario,
        "variant": variant,
        "forward_s": t1 - t0,
        "backward_s": t2 - t1,
        "total_s": t2 - t0,
        "baseline_rss_mib": baseline,
        "peak_extra_mib": peak - baseline,
        "peak_method": "VmHWM reset via /proc/self/clear_refs" if reset else "ru_maxrss difference",
        "loss": float(loss.detach()),
        "grad_norm": grad_norm,
        "torch_threads": torch.get_num_threads(),
    }


def _spawn(scenario: str, variant: str, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", f"{scenario}:{variant}", "--tokens", str(tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {scenario}:{variant} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], batch: int, seq: int) -> str:
    lines = [
        f"Generalized JSD (beta = {BETA}), {batch} x {seq} tokens, vocabulary {VOCAB}, float32, CPU, "
        "forward + backward.",
        "",
        "| scenario | variant | time (s) | time / naive | peak extra memory (MiB) | memory / naive | loss | "
        "grad norm (rel. diff vs naive) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['variant']} | {r['total_s']:.2f} | {r['time_ratio']:.2f}x | "
            f"{r['peak_extra_mib']:.0f} | {r['memory_ratio']:.2f}x | {r['loss']:.6f} | "
            f"{r['grad_norm']:.6e} ({r['grad_norm_rel_diff_vs_naive']:.1e}) |"
        )
    lines += [
        "",
        "Peak extra memory: beyond the inputs (logits, or hidden states + heads). Time: fastest of the "
        "interleaved rounds; the ratios carry the claims.",
        "",
        "Target: chunked peak memory <= 0.25x naive at <= 1.5x the time.",
    ]
    for r in rows:
        if r["variant"] != "naive":
            ok = r["memory_ratio"] <= 0.25 and r["time_ratio"] <= 1.5
            lines.append(
                f"- {r['scenario']} / {r['variant']}: memory {r['memory_ratio']:.2f}x, time "
                f"{r['time_ratio']:.2f}x -> {'met' if ok else 'not met'}"
            )
    return "\n".join(lines)


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--quick", action="store_true", help="2 x 512 tokens instead of 8 x 512")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (default benchmarks/results)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        scenario, variant = args.worker.split(":")
        print(json.dumps(run_worker(scenario, variant, args.tokens, VOCAB, HIDDEN, SEED)))
        return

    batch, seq = QUICK_TOKENS if args.quick else FULL_TOKENS
    tokens = batch * seq
    start = time.time()
    runs: dict[tuple[str, str], list[dict]] = {key: [] for key in VARIANTS}
    for rnd in range(ROUNDS):
        for scenario, variant in VARIANTS:
            result = _spawn(scenario, variant, tokens)
            runs[(scenario, variant)].append(result)
            print(
                f"[round {rnd + 1}/{ROUNDS}] {scenario:6s} {variant:12s} {result['total_s']:7.2f} s "
                f"{result['peak_extra_mib']:8.0f} MiB",
                file=sys.stderr,
            )

    rows = []
    for scenario, variant in VARIANTS:
        rs = runs[(scenario, variant)]
        best = min(rs, key=lambda r: r["total_s"])
        rows.append({**best, "peak_extra_mib": max(r["peak_extra_mib"] for r in rs),
                     "all_total_s": [r["total_s"] for r in rs],
                     "all_peak_extra_mib": [r["peak_extra_mib"] for r in rs]})  # fmt: skip
    for r in rows:
        naive = next(x for x in rows if x["scenario"] == r["scenario"] and x["variant"] == "naive")
        r["time_ratio"] = r["total_s"] / naive["total_s"]
        r["memory_ratio"] = r["peak_extra_mib"] / naive["peak_extra_mib"]
        r["loss_abs_diff_vs_naive"] = abs(r["loss"] - naive["loss"])
        r["grad_norm_rel_diff_vs_naive"] = abs(r["grad_norm"] - naive["grad_norm"]) / naive["grad_norm"]

    table = _table(rows, batch, seq)
    payload = {
        "quick": args.quick,
        "config": {"batch": batch, "seq": seq, "tokens": tokens, "vocab": VOCAB, "hidden": HIDDEN,
                   "beta": BETA, "dtype": "float32", "chunk_size": "library default", "rounds": ROUNDS},
        "seeds": {"inputs": SEED},
        "method": "fresh subprocess per variant and round; peak = VmHWM during fwd+bwd (reset after the "
        "inputs are allocated) minus VmRSS with the inputs allocated; time = fastest round",
        "results": rows,
        "wall_time_s": time.time() - start,
    }  # fmt: skip
    path = write_results("losses", payload, table, args.out)
    print(table)
    print(f"\nwrote {path} and {path.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
