"""Build a dataclass config from a Hydra/OmegaConf node or a plain mapping, with a clear error."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def dataclass_from_cfg(cls: type[T], values: Mapping[str, Any] | None, what: str = "config") -> T:
    """``cls(**values)`` for a DictConfig (resolved) or mapping; ``None`` gives the defaults.

    A key that is not a field of ``cls`` raises ``ValueError`` naming it and listing the valid fields
    (a typo in ``distill.lr=...`` must not be silently ignored).
    """
    from omegaconf import DictConfig, OmegaConf

    values = OmegaConf.to_container(values, resolve=True) if isinstance(values, DictConfig) \
        else dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{what} has unknown field(s) {unknown}; valid: {sorted(names)}")
    return cls(**values)
