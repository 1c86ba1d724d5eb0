"""tqdm progress bars that stay readable in CI logs (non-TTY: refresh every 10 s instead of per update)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(**kwargs) -> tqdm:
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 10.0)
        kwargs.setdefault("ascii", True)
    return tqdm(**kwargs)
