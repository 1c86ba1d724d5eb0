import random

import numpy as np
import pytest
import torch

from embodied_distill import checkpoint as ck
from embodied_distill.data.normalizer import Normalizer


def _norm():
    return Normalizer.fit({"state": np.random.default_rng(0).normal(size=(50, 4)),
                           "action": np.random.default_rng(1).normal(size=(50, 2))})


def test_checkpoint_round_trip_without_pickle(tmp_path):
    state = {"w": torch.randn(3, 4), "b": torch.zeros(4)}
    path = ck.save_checkpoint(tmp_path / "ckpt", state, _norm(), {"policy": {"name": "mlp"}, "seed": 3},
                              meta={"step": 7})
    assert sorted(p.name for p in path.iterdir()) == sorted(ck.CHECKPOINT_FILES)
    st, norm, cfg, meta = ck.load_checkpoint(path)
    assert torch.equal(st["w"], state["w"]) and cfg["seed"] == 3 and meta["step"] == 7
    assert "torch" in meta["versions"] and "git_sha" in meta
    assert torch.equal(norm.params["state"]["scale"], _norm().params["state"]["scale"])


def test_corrupt_or_incomplete_checkpoint_gives_clear_error(tmp_path):
    path = ck.save_checkpoint(tmp_path / "c", {"w": torch.ones(2)}, _norm(), {"a": 1})
    (path / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ck.CheckpointError, match="corrupt"):
        ck.load_checkpoint(path)
    (path / "meta.json").unlink()
    with pytest.raises(ck.CheckpointError, match="missing meta.json"):
        ck.load_checkpoint(path)
    with pytest.raises(ck.CheckpointError, match="no checkpoint"):
        ck.load_checkpoint(tmp_path / "nothing")


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = ck.save_checkpoint(tmp_path / "c", {"w": torch.ones(2)}, _norm(), {"version": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        ck.save_checkpoint(path, {"w": torch.zeros(2)}, _norm(), {"version": 2})
    monkeypatch.undo()
    st, _, cfg, _ = ck.load_checkpoint(path)
    assert cfg["version"] == 1 and torch.equal(st["w"], torch.ones(2))
    assert not list(tmp_path.glob(".c.tmp-*"))  # no temp directory left behind


def test_rename_crash_is_recovered(tmp_path):
    path = ck.save_checkpoint(tmp_path / "c", {"w": torch.ones(2)}, _norm(), {"v": 1})
    path.rename(tmp_path / ".c.old-123")  # crash between the two renames: only the old copy exists
    _, _, cfg, _ = ck.load_checkpoint(path)
    assert cfg["v"] == 1


def test_train_state_restores_model_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
    ck.save_train_state(tmp_path / "ts", 3, model.state_dict(), opt, extra={"note": "x"})
    expect = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(123), np.random.seed(5), random.seed(9)  # scramble
    state = ck.load_train_state(tmp_path / "ts")
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1]) and expect[2] == got[2]
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    assert state["step"] == 3 and state["extra"] == {"note": "x"}
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert float(a["step"]) == float(b["step"])
    assert ck.load_train_state(tmp_path / "none") is None
