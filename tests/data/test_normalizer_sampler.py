import numpy as np
import pytest
import torch

from embodied_distill.data.normalizer import Normalizer
from embodied_distill.data.sampler import SequenceDataset


def test_limits_normalizer_maps_range_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform([-3, 10, 0], [5, 20, 1e-4], size=(500, 3))
    norm = Normalizer.fit({"state": x}, mode="limits", eps=1e-2)
    y = norm.normalize("state", torch.as_tensor(x, dtype=torch.float32))
    assert torch.allclose(y[:, :2].min(0).values, torch.tensor([-1.0, -1.0]), atol=1e-5)
    assert torch.allclose(y[:, :2].max(0).values, torch.tensor([1.0, 1.0]), atol=1e-5)
    # the near-constant third feature is floored to a range of eps, so it stays small
    assert y[:, 2].abs().max() < 0.02
    norm.save(tmp_path / "n.safetensors")
    back = Normalizer.load(tmp_path / "n.safetensors")
    z = back.unnormalize("state", back.normalize("state", torch.as_tensor(x, dtype=torch.float32)))
    assert torch.allclose(z, torch.as_tensor(x, dtype=torch.float32), atol=1e-4)


def test_gaussian_normalizer_and_errors():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=(4000, 2))
    norm = Normalizer.fit({"a": x}, mode="gaussian")
    y = norm.normalize("a", torch.as_tensor(x, dtype=torch.float32))
    assert torch.allclose(y.mean(0), torch.zeros(2), atol=1e-4)
    assert torch.allclose(y.std(0), torch.ones(2), atol=1e-3)
    with pytest.raises(ValueError, match="NaN"):
        Normalizer.fit({"a": np.array([[np.nan]])})
    with pytest.raises(KeyError, match="no statistics"):
        norm.normalize("missing", torch.zeros(1, 2))
    with pytest.raises(ValueError, match="mode"):
        Normalizer.fit({"a": x}, mode="minmax")


def test_sequence_windows_pad_at_episode_edges():
    data = {"state": np.arange(10, dtype=np.float32)[:, None],
            "action": 100 + np.arange(10, dtype=np.float32)[:, None]}
    ds = SequenceDataset(data, np.array([4, 10]), ["state"], obs_horizon=3, action_horizon=4)
    assert len(ds) == 10
    first = ds[0]
    assert first["state"][:, 0].tolist() == [0, 0, 0]  # repeats the first obs before the start
    assert first["action"][:, 0].tolist() == [100, 101, 102, 103]
    end = ds[3]  # last step of episode 0: actions past the end repeat the last one and are masked
    assert end["state"][:, 0].tolist() == [1, 2, 3]
    assert end["action"][:, 0].tolist() == [103, 103, 103, 103]
    assert end["action_is_pad"].tolist() == [False, True, True, True]
    start2 = ds[4]  # windows never cross into the previous episode
    assert start2["state"][:, 0].tolist() == [4, 4, 4]
    batch = ds.get_batch(torch.tensor([0, 3, 4]))
    assert batch["state"].shape == (3, 3, 1) and batch["action"].shape == (3, 4, 1)
    assert torch.equal(batch["action"][1], end["action"])


def test_episode_starts_can_be_drawn_more_often():
    """start_steps=2, start_repeat=3: the first two windows of each episode appear three times, the others
    once; the windows themselves are unchanged."""
    data = {"state": np.arange(10, dtype=np.float32)[:, None],
            "action": 100 + np.arange(10, dtype=np.float32)[:, None]}
    plain = SequenceDataset(data, np.array([4, 10]), ["state"], obs_horizon=1, action_horizon=2)
    ds = SequenceDataset(data, np.array([4, 10]), ["state"], obs_horizon=1, action_horizon=2, start_steps=2,
                         start_repeat=3)
    assert len(ds) == 10 + 2 * 2 * 2
    steps = [int(ds[i]["state"][0, 0]) for i in range(len(ds))]
    assert sorted(steps) == sorted(list(range(10)) + [0, 1, 4, 5] * 2)
    extra = ds.get_batch(torch.arange(10, len(ds)))
    same = plain.get_batch(torch.tensor([0, 1, 4, 5] * 2))
    assert all(torch.equal(extra[k], same[k]) for k in ("state", "action", "action_is_pad"))
    with pytest.raises(ValueError, match="start_repeat"):
        SequenceDataset(data, np.array([4, 10]), ["state"], start_steps=2, start_repeat=0)
