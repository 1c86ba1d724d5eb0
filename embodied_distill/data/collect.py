"""Parallel demonstration collection into an EpisodeStore, resumable and deterministic.

Episode ``k`` is always rolled out with seed ``seed_start + k'`` in increasing order, results are
appended in seed order, failed episodes are counted and dropped, and a rerun after a crash continues
from the seed after the last stored one. Worker ``w`` of ``W`` always rolls out the seeds ``w, w + W,
...`` (``striped_imap``), so what each worker's env ran before an episode does not depend on process
scheduling: a simulator that keeps state across resets (PhysX's contact caches do) still gives the
same demo set on every run with the same number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embodied_distill.data.episode_store import EpisodeStore
from embodied_distill.progress import progress

_ENV = None


def _init_worker(make_env: Callable[[], Any]) -> None:
    global _ENV
    import torch

    torch.set_num_threads(1)
    _ENV = make_env()


def _run(args):
    episode_fn, seed = args
    return episode_fn(_ENV, seed)


def _striped_worker(fn: Callable[[Any], Any], items: Sequence[Any], out, initializer: Callable[..., None],
                    initargs: tuple) -> None:
    try:
        initializer(*initargs)
        for item in items:
            out.put(("ok", fn(item)))
    except BaseException:  # report to the parent instead of dying silently
        out.put(("error", traceback.format_exc()))


def striped_imap(fn: Callable[[Any], Any], items: Sequence[Any], num_workers: int,
                 initializer: Callable[..., None], initargs: tuple = ()) -> Iterator[Any]:
    """``fn(item)`` for each item, yielded in order, computed by ``num_workers`` forkserver processes.

    Unlike ``Pool.imap``, worker ``w`` always handles items ``w, w + W, w + 2W, ...`` in order (each
    worker prefetches at most two results), so each worker's history is fixed by ``items`` and ``W``.
    Workers start with ``initializer(*initargs)``; an exception in a worker is raised here with its
    traceback; the workers are stopped when the caller stops iterating.
    """
    ctx = mp.get_context("forkserver")
    n = max(1, min(int(num_workers), len(items)))
    queues = [ctx.Queue(maxsize=2) for _ in range(n)]
    procs = [ctx.Process(target=_striped_worker, args=(fn, items[w::n], queues[w], initializer, initargs),
                         daemon=True) for w in range(n)]
    for p in procs:
        p.start()
    try:
        for i in range(len(items)):
            w = i % n
            while True:
                try:
                    status, value = queues[w].get(timeout=1.0)
                    break
                except queue.Empty:
                    if not procs[w].is_alive():
                        code = procs[w].exitcode
                        raise RuntimeError(f"worker {w} died (exit code {code}) before item {i}") from None
            if status == "error":
                raise RuntimeError(f"worker {w} failed on item {i}:\n{value}")
            yield value
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()


def open_demo_store(store_path: str | Path, attrs: Mapping[str, Any] | None, seed_start: int
                    ) -> tuple[EpisodeStore, int, int]:
    """Open (or create) a demo store for appending; refuse one generated with other ``attrs``.

    Returns ``(store, episodes already stored, next seed to roll out)``: the seed after the last
    stored one, so a rerun after a crash continues where the last run stopped.
    """
    store = EpisodeStore(store_path, mode="a")
    attrs = dict(attrs or {})
    if store.n_episodes and attrs:
        old = {k: store.attrs.get(k) for k in attrs}
        if old != attrs:
            raise ValueError(f"demo store {store_path} was generated with {old}, not {attrs}; "
                             "delete it or point demos.path elsewhere")
    store.set_attrs(**attrs)
    have = store.n_episodes
    next_seed = int(store.episode_meta("seed").max()) + 1 if have else int(seed_start)
    return store, have, next_seed


def collect_demos(store_path: str | Path, make_env: Callable[[], Any],
                  episode_fn: Callable[[Any, int], Mapping[str, Any]], n_episodes: int,
                  seed_start: int = 0, num_workers: int = 2, attrs: Mapping[str, Any] | None = None,
                  max_attempts_factor: float = 3.0, desc: str = "demos") -> dict[str, Any]:
    """Collect until the store holds ``n_episodes`` successful episodes.

    Args:
        make_env: picklable zero-argument env factory (called once per worker).
        episode_fn: picklable ``(env, seed) -> {"state", "action", "success", "seed", ...}``.
        attrs: generation settings saved in the store; a store made with other settings is refused.
        max_attempts_factor: give up after ``n_episodes * factor`` attempts (expert failing too often).

    Returns a summary: stored, attempted, successes, success rate of the attempts made now.

    Collection holds an exclusive lock on ``<store>.lock``: a second process asking for the same store
    (two runs sharing ``demos.dir``) waits, then finds the episodes stored and only adds what it lacks;
    unlocked, both appended the same seeds.
    """
    import fcntl

    lock_path = Path(str(store_path).rstrip("/") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _collect_locked(store_path, make_env, episode_fn, n_episodes, seed_start, num_workers, attrs,
                               max_attempts_factor, desc)


def _collect_locked(store_path, make_env, episode_fn, n_episodes, seed_start, num_workers, attrs,
                    max_attempts_factor, desc) -> dict[str, Any]:
    store, have, next_seed = open_demo_store(store_path, attrs, seed_start)
    todo = n_episodes - have
    summary = {"stored": have, "attempted": 0, "successes": 0, "resumed_from": have}
    if todo <= 0:
        return summary
    max_attempts = int(np.ceil(todo * max_attempts_factor))
    seeds = range(next_seed, next_seed + max_attempts)
    bar = progress(total=n_episodes, initial=have, desc=desc, unit="ep")
    for ep in striped_imap(_run, [(episode_fn, s) for s in seeds], num_workers, _init_worker, (make_env,)):
        summary["attempted"] += 1
        if ep["success"] and len(ep["action"]) > 0:
            summary["successes"] += 1
            store.add_episode({"state": ep["state"], "action": ep["action"]}, meta={"seed": ep["seed"]})
            bar.update(1)
            if store.n_episodes >= n_episodes:
                break
        rate = summary["successes"] / summary["attempted"]
        bar.set_postfix(expert_success=f"{rate:.2f}", refresh=False)
    bar.close()
    summary["stored"] = store.n_episodes
    if store.n_episodes < n_episodes:
        raise RuntimeError(f"expert succeeded only {summary['successes']}/{summary['attempted']} times; "
                           f"store has {store.n_episodes} < {n_episodes} episodes")
    return summary
