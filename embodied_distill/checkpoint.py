"""Checkpoints as directories, written atomically, loaded without pickle.

A checkpoint directory holds::

    config.yaml              the full resolved training config (the policy is rebuilt from it)
    model.safetensors        policy weights
    normalizer.safetensors   the Normalizer's statistics
    meta.json                versions, git sha, step, metrics

Training state for resuming (optimizer, RNG states, step) is a sibling directory of the same kind
(``train_state.safetensors`` + ``train_state.json``). Both are written into a temporary directory
next to the target and then swapped in with ``os.replace``, so a crash at any point leaves either the
previous complete checkpoint or the new complete one.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from embodied_distill.data.normalizer import Normalizer

CHECKPOINT_FILES = ("config.yaml", "model.safetensors", "normalizer.safetensors", "meta.json")


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or corrupt."""


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("embodied-distill", "mani-skill", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _atomic_dir_write(target: Path, write) -> None:
    """Call ``write(tmp_dir)`` then atomically replace ``target`` with ``tmp_dir``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():  # make the data durable before the rename publishes it
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(target: Path) -> None:
    """If a crash happened between the two renames of ``_atomic_dir_write``, restore the old copy."""
    target = Path(target)
    if target.exists():
        return
    olds = sorted(target.parent.glob(f".{target.name}.old-*"))
    if olds:
        os.replace(olds[-1], target)


def save_checkpoint(path: str | Path, model_state: Mapping[str, torch.Tensor], normalizer: Normalizer,
                    config: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> Path:
    """Write a complete checkpoint directory atomically; returns its path."""
    path = Path(path)
    meta = {"versions": versions(), "git_sha": git_sha(), **(meta or {})}

    def write(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()},
                  str(tmp / "model.safetensors"))
        normalizer.save(tmp / "normalizer.safetensors")
        (tmp / "config.yaml").write_text(yaml.safe_dump(_plain(config), sort_keys=False))
        (tmp / "meta.json").write_text(json.dumps(_plain(meta), indent=2))

    _atomic_dir_write(path, write)
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], Normalizer, dict, dict]:
    """Returns ``(model_state, normalizer, config, meta)``; raises CheckpointError with the reason."""
    path = Path(path)
    recover_dir(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    try:
        state = load_file(str(path / "model.safetensors"))
        normalizer = Normalizer.load(path / "normalizer.safetensors")
        config = yaml.safe_load((path / "config.yaml").read_text())
        meta = json.loads((path / "meta.json").read_text())
    except (SafetensorError, OSError, ValueError, yaml.YAMLError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {type(e).__name__}: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: config.yaml is not a mapping")
    return state, normalizer, config, meta


# ---------------------------------------------------------------------------- training state
def _flatten_optimizer(opt_state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, pid, k = name.split(".", 2)
            state.setdefault(int(pid), {})[k] = t
    for name, v in info["scalars"].items():
        pid, k = name.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": info["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    np_state = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(),
               "rng.numpy_keys": torch.as_tensor(np_state[1].astype(np.int64))}
    info = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": _plain(random.getstate())}
    return tensors, info


def set_rng_state(tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    name, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((name, tensors["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    py = info["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_train_state(path: str | Path, step: int, model_state: Mapping[str, torch.Tensor],
                     optimizer: torch.optim.Optimizer,
                     extra_tensors: Mapping[str, torch.Tensor] | None = None,
                     extra: Mapping[str, Any] | None = None) -> Path:
    """Everything needed to resume training at ``step``, written atomically, no pickle."""
    opt_t, opt_info = _flatten_optimizer(optimizer.state_dict())
    rng_t, rng_info = rng_state()
    tensors = {**{f"model.{k}": v.detach().cpu().contiguous() for k, v in model_state.items()},
               **opt_t, **rng_t, **{f"extra.{k}": v.detach().cpu().contiguous()
                                    for k, v in (extra_tensors or {}).items()}}
    info = {"step": int(step), "optimizer": opt_info, "rng": rng_info, "extra": _plain(extra or {})}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "train_state.safetensors"))
        (tmp / "train_state.json").write_text(json.dumps(_plain(info)))

    _atomic_dir_write(Path(path), write)
    return Path(path)


def load_train_state(path: str | Path) -> dict[str, Any] | None:
    """Returns ``{"step", "model", "optimizer", "extra", "extra_tensors"}`` (RNG restored), or None."""
    path = Path(path)
    recover_dir(path)
    if not (path / "train_state.json").is_file():
        return None
    try:
        tensors = load_file(str(path / "train_state.safetensors"))
        info = json.loads((path / "train_state.json").read_text())
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"training state {path} is corrupt: {type(e).__name__}: {e}") from e
    set_rng_state(tensors, info["rng"])
    return {
        "step": info["step"],
        "model": {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
        "optimizer": _unflatten_optimizer(tensors, info["optimizer"]),
        "extra": info["extra"],
        "extra_tensors": {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")},
    }


def _plain(obj: Any) -> Any:
    """Convert OmegaConf containers, tuples, numpy and torch scalars to YAML/JSON-safe Python."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, DictConfig | ListConfig):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a core dependency
        pass
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if torch.is_tensor(obj) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj
