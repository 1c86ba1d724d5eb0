"""Shared helpers for benchmark scripts: machine description and writing ``<name>.json`` / ``<name>.md``."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"


def git_sha() -> str:
    """``git rev-parse HEAD`` of the repository (suffixed ``-dirty`` with local changes), else
    ``"uncommitted"``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"
    return f"{sha}-dirty" if dirty else sha


def _total_memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict:
    """Where the numbers came from: OS, CPU, core count, memory, Python and torch versions."""
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "memory_gib": _total_memory_gib(),
        "python": platform.python_version(),
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    return info


def scoped_overrides(items: list[str], task: str) -> list[str]:
    """The command-line overrides that apply to ``task``: ``KEY=VALUE`` (every task) or ``TASK:KEY=VALUE``
    (only ``task``; the scope is read from the key, so a value may hold a colon)."""
    out = []
    for kv in items:
        scope, sep, _ = kv.partition("=")[0].partition(":")
        if not sep:
            out.append(kv)
        elif scope == task:
            out.append(kv[len(scope) + 1:])
    return out


def write_results(name: str, payload: dict, table_md: str, out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``<out_dir>/<name>.json`` (payload plus ``machine`` and ``git_sha`` unless already given) and
    ``<out_dir>/<name>.md`` (the Markdown table); returns the JSON path. Default: benchmarks/results."""
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, **payload}
    record.setdefault("machine", machine_info())
    record.setdefault("git_sha", git_sha())
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    (out / f"{name}.md").write_text(table_md.rstrip() + "\n")
    return json_path


def status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``: resident now, ``VmHWM``: peak) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
