"""A VLA teacher behind the policy server (``real_robot/server.py``), used during training like a local one.

    python -m embodied_distill.real_robot.server checkpoint=outputs/vla_teacher/libero_object/checkpoint
    teacher = RemoteVLATeacher("tcp://gpu-box:5555", keys_dir=..., server_key=...)
    logits = teacher.action_distribution(obs)      # (B, Ta, Da, n_bins), as VLAPolicy.action_distribution
    chunk = teacher.predict_action_chunk(obs)      # (B, Ta, Da) argmax actions, data units

It is the robot bridge's ``RemotePolicy`` (one client for robots and teachers) with the VLA's return types:
the server sends a VLA's logits as ``{"logits": ...}`` and this client hands back the tensor. Sampling at a
temperature needs the teacher's action normaliser; pass ``normalizer`` (e.g. ``Normalizer.load`` of the
checkpoint's ``normalizer.safetensors``) to sample here from the served logits.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from embodied_distill.policies.vla.tokenizer import ActionTokenizer, sample_tokens
from embodied_distill.real_robot.client import RemotePolicy
from torch import Tensor

from embodied_distill.data.normalizer import Normalizer


class RemoteVLATeacher(RemotePolicy):
    """A served VLA with the VLA teacher interface (``action_distribution`` returns the logits tensor).

    Args:
        address, keys_dir, server_key, auth, timeout_s: as ``RemotePolicy``.
        normalizer: the served policy's normaliser (its ``action`` statistics); needed only for
            ``predict_action_chunk(temperature > 0)``.
        name: the Hydra config group label (``teacher=remote``); ignored.
    """

    def __init__(self, address: str = "tcp://127.0.0.1:5555", *, keys_dir: str | None = None,
                 server_key: str | None = None, auth: bool = True, timeout_s: float = 10.0,
                 normalizer: Normalizer | None = None, name: str | None = None):
        super().__init__(address, keys_dir=keys_dir, server_key=server_key, auth=auth, timeout_s=timeout_s)
        if not self.info.get("has_action_distribution", False):
            self.close()
            raise TypeError(f"the served policy {self.info.get('name')!r} has no action_distribution; "
                            "a VLA teacher must expose its action-token logits")
        if "instruction" not in self.config.obs_keys:
            self.close()
            raise TypeError(f"the served policy reads {list(self.config.obs_keys)}, not an instruction: "
                            "not a VLA")
        self.normalizer = normalizer

    def action_distribution(self, obs: Mapping[str, Any]) -> Tensor:  # type: ignore[override]
        """Observation dict (``instruction``: B strings) -> (B, Ta, Da, n_bins) float32 logits (CPU)."""
        dist = super().action_distribution(obs)
        if "logits" not in dist:
            raise TypeError(f"the server returned {sorted(dist)}, not token logits")
        return dist["logits"]

    def predict_action_chunk(self, obs: Mapping[str, Any], temperature: float = 0.0,  # type: ignore[override]
                             generator: torch.Generator | None = None) -> Tensor:
        """(B, Ta, Da) in data units: the server's argmax at temperature 0, else sampled here from the
        served logits (needs ``normalizer``)."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if temperature == 0:
            return super().predict_action_chunk(obs)
        if self.normalizer is None:
            raise ValueError("sampling a remote VLA at temperature > 0 needs its action normaliser: pass "
                             "normalizer=Normalizer.load('<checkpoint>/normalizer.safetensors')")
        logits = self.action_distribution(obs)
        tokens = sample_tokens(logits, temperature, generator)
        return self.normalizer.unnormalize("action", ActionTokenizer(logits.shape[-1]).decode(tokens))

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """A remote teacher holds no local parameters (lets code that counts a teacher's size run)."""
        return iter(())
