"""Import ManiSkill's own ``.h5`` trajectory files (with their ``.json`` sidecar) into an EpisodeStore.

ManiSkill stores ``traj_<i>/obs`` with T+1 rows (the observation after the last action too) and
``traj_<i>/actions`` with T rows; the importer keeps the T (obs, action) pairs. Only flat state
observations (``obs_mode=state``) are imported; convert other trajectories first with
``python -m mani_skill.trajectory.replay_trajectory -o state -c <control_mode> --save-traj``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from embodied_distill.data.episode_store import EpisodeStore


def import_maniskill_h5(h5_path: str | Path, store_path: str | Path, only_success: bool = True,
                        max_episodes: int | None = None) -> dict[str, Any]:
    """Append the trajectories of ``h5_path`` to the store at ``store_path``; returns a summary."""
    import h5py

    h5_path = Path(h5_path)
    json_path = h5_path.with_suffix(".json")
    episodes_meta = {}
    control_mode = None
    if json_path.is_file():
        info = json.loads(json_path.read_text())
        episodes_meta = {int(e["episode_id"]): e for e in info.get("episodes", [])}
        control_mode = (info.get("env_info", {}).get("env_kwargs", {}) or {}).get("control_mode")
    store = EpisodeStore(store_path, mode="a")
    imported = skipped = 0
    with h5py.File(h5_path, "r") as f:
        names = sorted((k for k in f.keys() if k.startswith("traj_")), key=lambda k: int(k.split("_")[1]))
        for name in names:
            if max_episodes is not None and imported >= max_episodes:
                break
            g = f[name]
            if not isinstance(g.get("obs"), h5py.Dataset):
                raise ValueError(f"{h5_path}:{name}/obs is not a flat state array; replay the trajectory "
                                 "with '-o state' first")
            actions = np.asarray(g["actions"], np.float32)
            obs = np.asarray(g["obs"], np.float32)[: len(actions)]
            success = bool(np.asarray(g["success"])[-1]) if "success" in g else True
            if only_success and not success:
                skipped += 1
                continue
            ep_id = int(name.split("_")[1])
            meta = episodes_meta.get(ep_id, {})
            seed = meta.get("episode_seed", meta.get("reset_kwargs", {}).get("seed", -1))
            store.add_episode({"state": obs, "action": actions}, meta={"seed": int(seed)})
            imported += 1
    store.set_attrs(source=str(h5_path), control_mode=control_mode)
    return {"imported": imported, "skipped_failed": skipped, "episodes_in_store": store.n_episodes}
