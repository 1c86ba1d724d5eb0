"""striped_imap: ordered results, a fixed item-to-worker assignment, errors surfaced, clean early stop."""

import os

import pytest

from embodied_distill.data.collect import striped_imap

_STATE: dict = {}


def _init(tag):
    _STATE["tag"] = tag
    _STATE["seen"] = []


def _work(item):
    if item == "boom":
        raise ValueError("bad item")
    _STATE["seen"].append(item)
    return item, os.getpid(), list(_STATE["seen"]), _STATE["tag"]


def test_results_in_order_and_each_worker_gets_a_fixed_stripe():
    out = list(striped_imap(_work, list(range(10)), 3, _init, ("t",)))
    assert [r[0] for r in out] == list(range(10))
    assert all(r[3] == "t" for r in out)
    pids = [r[1] for r in out]
    assert len(set(pids)) == 3 and os.getpid() not in pids
    for i, (_item, pid, history, _) in enumerate(out):
        assert pid == pids[i % 3]
        assert history == list(range(i % 3, i + 1, 3))  # the worker ran exactly its stripe before


def test_worker_error_is_raised_with_its_traceback():
    with pytest.raises(RuntimeError, match="ValueError: bad item"):
        list(striped_imap(_work, [0, 1, "boom", 3], 2, _init, ("t",)))


def test_stopping_early_stops_the_workers():
    it = striped_imap(_work, list(range(1000)), 2, _init, ("t",))
    first = [next(it)[0] for _ in range(3)]
    it.close()
    assert first == [0, 1, 2]
