"""``RemotePolicy``: the Policy interface over the network (robot bridge, remote teachers).

    from embodied_distill.real_robot.client import RemotePolicy

    teacher = RemotePolicy("tcp://gpu-box:5555", keys_dir="~/.config/embodied_distill/keys",
                           server_key="keys/gpu-box-server.key")
    chunk = teacher.predict_action_chunk({"state": obs})          # (B, To, Ds) -> (B, Ta, Da) tensor
    dist = teacher.action_distribution({"state": obs})           # {"mean": ..., "std": ...} tensors
    action = teacher.select_action({"state": obs_t})             # (B, Ds) -> (B, Da)
    teacher.reset()

``select_action`` behaves like ``Policy.select_action``: the observation history and the open-loop
action queue live in this client and each re-plan is one ``predict_action_chunk`` call (the server
stays stateless). When the served policy declares a stateful sampler (``stateful_select_action``, e.g. a
streaming diffusion policy), ``select_action`` and ``reset`` are forwarded to the server instead and the
sampler's state lives there, owned by this client's session.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from embodied_distill.policies.base import ChunkExecutor
from embodied_distill.real_robot.protocol import MessageLimits
from embodied_distill.real_robot.rpc import ClientConfig, RPCClient
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class RemotePolicyConfig:
    """The served policy's shape, as reported by the server's ``hello``."""

    obs_keys: tuple[str, ...]
    """Observation keys the policy reads."""
    obs_horizon: int
    """To: observations per prediction."""
    action_horizon: int
    """Ta: length of a predicted chunk."""
    n_action_steps: int
    """Actions executed per chunk by ``select_action``."""
    action_dim: int
    """Da."""
    obs_dim: int = 0
    """Total observation features (0 when the policy does not say)."""


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


class RemotePolicy:
    """A policy served by ``PolicyServer``; implements ``predict_action_chunk``, ``select_action``, ``reset``
    and (when the served policy has it) ``action_distribution``.

    Args:
        address: ``tcp://HOST:PORT`` of the server (ignored when ``client`` is given).
        keys_dir: this client's key directory (None: the default one).
        server_key: the server's public key file (None: ``<keys_dir>/server.key``).
        auth: CURVE on (must match the server).
        timeout_s: reply deadline of one call.
        client: a full ``ClientConfig`` instead of the arguments above.
    """

    def __init__(self, address: str = "tcp://127.0.0.1:5555", *, keys_dir: str | None = None,
                 server_key: str | None = None, auth: bool = True, timeout_s: float = 2.0,
                 client: ClientConfig | None = None):
        self.client_config = client or ClientConfig(address=address, auth=auth, keys_dir=keys_dir,
                                                    server_key=server_key, timeout_s=timeout_s)
        self.session = uuid.uuid4().hex
        self._rpc = RPCClient(self.client_config)
        try:
            self.info: dict[str, Any] = self._rpc.call("hello", {"session": self.session,
                                                                 "client": "RemotePolicy"}).body
        except BaseException:
            self._rpc.close()
            raise
        server_limit = int(self.info.get("max_message_bytes", self._rpc.limits.max_message_bytes))
        if server_limit < self._rpc.limits.max_message_bytes:  # refuse locally what the server would drop
            self._rpc.limits = MessageLimits(max_message_bytes=server_limit)
        self.config = RemotePolicyConfig(tuple(self.info["obs_keys"]), int(self.info["obs_horizon"]),
                                         int(self.info["action_horizon"]), int(self.info["n_action_steps"]),
                                         int(self.info["action_dim"]), int(self.info.get("obs_dim", 0)))
        self.name = f"remote:{self.info.get('name', '?')}"
        self.supports_warm_start = bool(self.info.get("supports_warm_start", False))
        self.stateful_select_action = bool(self.info.get("stateful_select_action", False))
        self.last_timing: dict[str, float] = {}
        self._exec = ChunkExecutor(self.config.obs_horizon, self.config.n_action_steps)
        if not self.info.get("has_action_distribution", False):
            self.action_distribution = None  # type: ignore[assignment]  # "has no distribution", like a Policy

    # ------------------------------------------------------------------ Policy interface
    def _split_obs(self, obs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``obs`` -> (request body with text observations, numeric arrays)."""
        missing = [k for k in self.config.obs_keys if k not in obs]
        if missing:
            raise KeyError(f"observation keys {missing} missing; the remote policy reads "
                           f"{list(self.config.obs_keys)}")
        arrays, text = {}, {}
        for k in self.config.obs_keys:
            v = obs[k]
            is_text = isinstance(v, list | tuple) and bool(v) and all(isinstance(x, str) for x in v)
            if isinstance(v, str) or is_text:
                text[k] = [v] if isinstance(v, str) else list(v)  # e.g. a VLA's instruction per sample
            else:
                arrays[k] = _np(v)
        return ({"session": self.session, "text": text} if text else {"session": self.session}), arrays

    def predict_action_chunk(self, obs: Mapping[str, Any], warm_start: Any = None) -> Tensor:
        """``{key: (B, To, ...)}`` -> (B, Ta, Da) float32 tensor (CPU), in data units.

        ``warm_start`` (B, Ta, Da): an initial guess (RTI); used when the served policy supports it.
        """
        body, arrays = self._split_obs(obs)
        if warm_start is not None:
            arrays["warm_start"] = _np(warm_start).astype(np.float32)
        rep = self._rpc.call("predict_chunk", body, arrays)
        self.last_timing = {"infer_ms": float(rep.body.get("infer_ms", float("nan")))}
        return torch.from_numpy(rep.arrays["action"])

    def action_distribution(self, obs: Mapping[str, Any]) -> dict[str, Tensor]:
        """``{key: (B, To, ...)}`` -> the served distribution's tensors (``mean``/``std``, ``logits``...)."""
        rep = self._rpc.call("action_distribution", *self._split_obs(obs))
        return {k: torch.from_numpy(v) for k, v in rep.arrays.items()}

    def select_action(self, obs: Mapping[str, Any]) -> Tensor:
        """``{key: (B, ...)}`` for the current step -> (B, Da); re-plans every ``n_action_steps``."""
        if self.stateful_select_action:
            rep = self._rpc.call("select_action", *self._split_obs(obs))
            return torch.from_numpy(rep.arrays["action"])
        body, current = self._split_obs(obs)
        self._exec.observe(current)
        # text has no time axis
        return self._exec.next_action(lambda: self.predict_action_chunk(
            {**self._exec.stacked(np.stack), **body.get("text", {})}))

    def reset(self) -> None:
        """Clear the local history and queue; with a stateful served policy, reset it (claims the session)."""
        self._exec.clear()
        if self.stateful_select_action:
            self._rpc.call("reset", {"session": self.session})

    # ------------------------------------------------------------------ extras
    def ping(self) -> dict[str, Any]:
        return self._rpc.call("ping").body

    def estop(self, reason: str = "estop") -> None:
        """Latch the server's e-stop: every later prediction is refused until ``estop_release``."""
        self._rpc.call("estop", {"reason": reason})

    def estop_release(self) -> None:
        self._rpc.call("estop_release", {"confirm": True})

    def to(self, device: Any) -> RemotePolicy:  # the Policy-style no-ops that evaluation code calls
        return self

    def eval(self) -> RemotePolicy:
        return self

    def close(self) -> None:
        self._rpc.close()

    def __enter__(self) -> RemotePolicy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
