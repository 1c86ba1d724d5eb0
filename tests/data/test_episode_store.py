import json

import numpy as np
import pytest
import zarr

from embodied_distill.data.episode_store import EpisodeStore


def _ep(t, d=3, offset=0.0):
    return {"state": np.arange(t * d, dtype=np.float32).reshape(t, d) + offset,
            "action": np.full((t, 2), offset, np.float64)}


def test_roundtrip_and_layout(tmp_path):
    path = tmp_path / "demos.zarr"
    store = EpisodeStore(path)
    store.add_episode(_ep(4), meta={"seed": 10, "instruction": "pick up the red cube"})
    store.add_episode(_ep(3, offset=100.0), meta={"seed": 11, "instruction": "stack"})
    ro = EpisodeStore(path, mode="r")
    assert ro.n_episodes == 2 and ro.n_steps == 7
    np.testing.assert_array_equal(ro.episode_ends, [4, 7])
    np.testing.assert_array_equal(ro.get_episode(1)["state"], _ep(3, offset=100.0)["state"])
    assert ro.get_episode(1)["action"].dtype == np.float64
    assert list(ro.episode_meta("instruction")) == ["pick up the red cube", "stack"]
    np.testing.assert_array_equal(ro.episode_meta("seed"), [10, 11])
    # diffusion_policy layout, zarr format 2 on disk
    raw = zarr.open_group(str(path), mode="r")
    assert raw["data"]["state"].shape == (7, 3)
    assert raw["meta"]["episode_ends"][:].tolist() == [4, 7]
    assert json.loads((path / "meta" / "episode_ends" / ".zarray").read_text())["zarr_format"] == 2


def test_crashed_append_is_invisible_and_overwritten(tmp_path):
    path = tmp_path / "demos.zarr"
    store = EpisodeStore(path)
    store.add_episode(_ep(4))
    # simulate a crash after the data arrays grew but before episode_ends was committed
    raw = zarr.open_group(str(path), mode="a")
    for key in ("state", "action"):
        raw["data"][key].resize((9, *raw["data"][key].shape[1:]))
    raw["meta"]["episode_ends"].resize((2,))  # grown, but its new entry was never written
    ro = EpisodeStore(path, mode="r")
    assert ro.n_episodes == 1 and ro.n_steps == 4
    assert ro.load()["state"].shape == (4, 3)
    # the next append overwrites the half-written rows
    store = EpisodeStore(path)
    store.add_episode(_ep(2, offset=5.0))
    np.testing.assert_array_equal(store.episode_ends, [4, 6])
    assert store.load()["state"].shape == (6, 3)
    np.testing.assert_array_equal(store.get_episode(1)["state"], _ep(2, offset=5.0)["state"])


def test_bad_input_is_refused_and_loses_nothing(tmp_path):
    store = EpisodeStore(tmp_path / "s.zarr")
    store.add_episode(_ep(3))
    with pytest.raises(ValueError, match="differ"):
        store.add_episode({"state": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="common non-zero length"):
        store.add_episode({"state": np.zeros((2, 3)), "action": np.zeros((3, 2))})
    with pytest.raises(ValueError, match="shape"):
        store.add_episode({"state": np.zeros((2, 4)), "action": np.zeros((2, 2))})
    assert store.n_episodes == 1 and store.n_steps == 3
    with pytest.raises(FileNotFoundError):
        EpisodeStore(tmp_path / "missing.zarr", mode="r")
    with pytest.raises(PermissionError):
        EpisodeStore(tmp_path / "s.zarr", mode="r").add_episode(_ep(1))
