"""Policy server: serve any Policy (student or teacher) over an authenticated ZeroMQ link.

    python -m embodied_distill.real_robot.server checkpoint=DIR [server.port=5555] [server.host=127.0.0.1]
    python -m embodied_distill.deploy mode=serve checkpoint=DIR           # the same

Once bound it prints one line ``POLICY_SERVER_READY {"address": ..., "server_key": ...}`` on stdout.
Clients use :class:`embodied_distill.real_robot.client.RemotePolicy`, which implements the Policy
interface, so a remote teacher and the robot bridge are the same client.

Message types (request body / arrays -> reply body / arrays; ``B`` batch, ``To`` obs horizon):

=====================  =================================================  ==============================
``hello``              ``{session, client}``                              policy info (obs keys, horizons,
                                                                          action_dim, capabilities)
``predict_chunk``      obs ``{key: (B, To, ...)}``, optional              ``{"action": (B, Ta, Da)}``,
                       ``warm_start`` (B, Ta, Da)                         ``{infer_ms, warm_started}``
``action_distribution``obs ``{key: (B, To, ...)}``                        the distribution's tensors
                                                                          (``mean``/``std`` or ``logits``...)
``select_action``      ``{session}``, obs ``{key: (B, ...)}``             ``{"action": (B, Da)}`` (stateful)
``reset``              ``{session}``                                      claims the stateful session
``estop``              ``{reason}``                                       latched: predictions refused
``estop_release``      ``{confirm: true}``                                clears the latch
``ping``               -                                                  server stats
=====================  =================================================  ==============================

Text observations (a VLA's ``instruction``) travel in the request body as ``{"text": {key: [B strings]}}``
and reach the policy as lists of strings. ``predict_chunk`` and ``action_distribution`` are stateless
and serve many clients. ``select_action`` keeps the policy's own state (observation history, action
queue, or a streaming / RTI sampler's buffer), so only the session that last called ``reset`` may use
it (others get ``busy``) until that session has been idle for ``session_timeout_s``. A policy that
declares ``stateful_select_action`` (its sampler carries state from one chunk to the next) has
``predict_chunk`` owned the same way.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from embodied_distill.real_robot.protocol import ErrorCode, Message, ProtocolError, reply
from embodied_distill.real_robot.rpc import RPCServer, ServerConfig

READY_PREFIX = "POLICY_SERVER_READY "


def policy_info(policy: Any) -> dict[str, Any]:
    """What a client needs to know to drive ``policy``: obs keys, horizons, sizes and capabilities."""
    cfg = policy.config
    return {
        "name": str(getattr(policy, "name", type(policy).__name__)),
        "obs_keys": list(cfg.obs_keys),
        "obs_horizon": int(cfg.obs_horizon),
        "action_horizon": int(cfg.action_horizon),
        "n_action_steps": int(cfg.n_action_steps),
        "action_dim": int(cfg.action_dim),
        "obs_dim": int(getattr(cfg, "obs_dim", 0)),
        "has_action_distribution": callable(getattr(policy, "action_distribution", None)),
        "supports_warm_start": bool(getattr(policy, "supports_warm_start", False)),
        "stateful_select_action": bool(getattr(policy, "stateful_select_action", False)),
    }


def distribution_arrays(dist: Any) -> dict[str, np.ndarray]:
    """An ``action_distribution`` result as named arrays.

    Accepts a mapping of tensors/arrays (passed through), a ``torch.distributions`` object with
    ``loc``/``scale`` (-> ``mean``, ``std``) or ``logits`` (-> ``logits``), a ``(mean, std)`` tuple, or a
    bare tensor, which is taken as categorical logits (a VLA's (B, Ta, Da, n_bins) action-token logits).
    """
    def arr(x: Any) -> np.ndarray:
        return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)

    if hasattr(dist, "detach") and hasattr(dist, "shape"):
        return {"logits": arr(dist)}
    if isinstance(dist, Mapping):
        return {str(k): arr(v) for k, v in dist.items()}
    if hasattr(dist, "loc") and hasattr(dist, "scale"):
        return {"mean": arr(dist.loc), "std": arr(dist.scale)}
    if hasattr(dist, "logits"):
        return {"logits": arr(dist.logits)}
    if isinstance(dist, tuple) and len(dist) == 2:
        return {"mean": arr(dist[0]), "std": arr(dist[1])}
    raise TypeError(f"cannot serve an action distribution of type {type(dist).__name__}; return a dict of "
                    "tensors, a (mean, std) tuple, or a torch distribution with loc/scale or logits")


class PolicyServer(RPCServer):
    """Serves one policy object (see the module docstring for the messages).

    Args:
        policy: anything with the Policy interface: ``config`` (obs_keys, obs_horizon, action_horizon,
            n_action_steps, action_dim), ``predict_action_chunk(obs) -> (B, Ta, Da)``, ``reset()``,
            ``select_action(obs) -> (B, Da)``, optionally ``action_distribution(obs)``.
        config: where to listen.
        extra_info: merged into the ``hello`` reply (checkpoint path, task, ...).
        max_batch: largest batch B accepted in one request.
        session_timeout_s: idle time after which another session may take over ``select_action``.
    """

    name = "policy"
    error_code = ErrorCode.POLICY_ERROR

    def __init__(self, policy: Any, config: ServerConfig | None = None,
                 extra_info: Mapping[str, Any] | None = None, max_batch: int = 1024,
                 session_timeout_s: float = 5.0):
        super().__init__(config)
        if max_batch < 1 or session_timeout_s <= 0:
            raise ValueError("max_batch must be >= 1 and session_timeout_s > 0")
        self.policy = policy
        self.info = {**policy_info(policy), **dict(extra_info or {})}
        self.max_batch = max_batch
        self.session_timeout_s = session_timeout_s
        self._session: str | None = None
        self._session_seen = 0.0
        self.estop_reason: str | None = None
        self.handlers.update(hello=self._hello, predict_chunk=self._predict_chunk,
                             action_distribution=self._action_distribution, select_action=self._select_action,
                             reset=self._reset, estop=self._estop, estop_release=self._estop_release)

    # ------------------------------------------------------------------ helpers
    def _check_estop(self) -> None:
        if self.estop_reason is not None:
            raise ProtocolError(ErrorCode.ESTOPPED, f"policy server is e-stopped ({self.estop_reason}); "
                                                    "send estop_release with confirm=true to resume")

    def _obs(self, msg: Message, time_axis: bool):
        """Request -> ``{key: tensor | list[str]}`` with checks. Arrays are (B, To, ...) when ``time_axis``
        else (B, ...); text observations (e.g. a VLA's ``instruction``) travel in ``body.text`` as
        ``{key: [B strings]}``."""
        import torch

        keys = self.info["obs_keys"]
        text = msg.body.get("text", {})
        if not isinstance(text, dict) or not all(
                isinstance(v, list) and all(isinstance(x, str) for x in v) for v in text.values()):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "body.text must map keys to lists of strings")
        missing = [k for k in keys if k not in msg.arrays and k not in text]
        if missing:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"observation keys {missing} missing; the policy reads {keys}")
        array_keys = [k for k in keys if k in msg.arrays]
        batch = {msg.arrays[k].shape[0] if msg.arrays[k].ndim else -1 for k in array_keys}
        batch |= {len(text[k]) for k in keys if k in text and k not in msg.arrays}
        need = 3 if time_axis else 2
        for k in array_keys:
            if msg.arrays[k].ndim < need:
                raise ProtocolError(ErrorCode.BAD_REQUEST,
                                    f"obs {k!r} has shape {msg.arrays[k].shape}; expected "
                                    f"{'(B, To, ...)' if time_axis else '(B, ...)'}")
            if time_axis and msg.arrays[k].shape[1] != self.info["obs_horizon"]:
                raise ProtocolError(ErrorCode.BAD_REQUEST,
                                    f"obs {k!r} has To={msg.arrays[k].shape[1]}; the policy needs "
                                    f"obs_horizon={self.info['obs_horizon']}")
        if len(batch) != 1 or not 1 <= next(iter(batch)) <= self.max_batch:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"observation batch sizes {sorted(batch)} must agree and lie in "
                                f"[1, {self.max_batch}]")
        return {k: torch.from_numpy(msg.arrays[k]) if k in msg.arrays else list(text[k]) for k in keys}

    def _claim(self, session: Any, take: bool) -> None:
        if not isinstance(session, str) or not 0 < len(session) <= 128:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "body.session must be a string of 1-128 characters")
        now = time.monotonic()
        idle = now - self._session_seen > self.session_timeout_s
        if self._session not in (None, session) and not idle:
            raise ProtocolError(ErrorCode.BUSY, "the policy's stateful session belongs to another client; "
                                                f"retry after it has been idle {self.session_timeout_s}s")
        if self._session != session and not take:
            raise ProtocolError(ErrorCode.BUSY, "call reset (which claims the session) before select_action")
        self._session, self._session_seen = session, now

    # ------------------------------------------------------------------ handlers
    def _hello(self, msg: Message) -> Message:
        return reply(msg, {**self.info, "estopped": self.estop_reason is not None,
                           "max_message_bytes": self.config.max_message_bytes})

    def _predict_chunk(self, msg: Message) -> Message:
        import torch

        self._check_estop()
        if self.info["stateful_select_action"]:  # its sampler keeps state across chunks: one owner
            self._claim(msg.body.get("session"), take=False)
        obs = self._obs(msg, time_axis=True)
        warm = msg.arrays.get("warm_start")
        t0 = time.perf_counter()
        with torch.inference_mode():
            if warm is not None and self.info["supports_warm_start"]:
                chunk = self.policy.predict_action_chunk(obs, warm_start=torch.from_numpy(warm))
            else:
                chunk = self.policy.predict_action_chunk(obs)
        infer_ms = (time.perf_counter() - t0) * 1e3
        chunk = chunk.detach().float().cpu().numpy() if hasattr(chunk, "detach") else \
            np.asarray(chunk, np.float32)
        if chunk.ndim != 3:
            raise ValueError(f"policy returned an action chunk of shape {chunk.shape}, expected (B, Ta, Da)")
        return reply(msg, {"infer_ms": infer_ms, "warm_started": warm is not None and
                           self.info["supports_warm_start"]}, {"action": chunk})

    def _action_distribution(self, msg: Message) -> Message:
        import torch

        self._check_estop()
        if not self.info["has_action_distribution"]:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"policy {self.info['name']!r} has no action_distribution")
        obs = self._obs(msg, time_axis=True)
        with torch.inference_mode():
            dist = self.policy.action_distribution(obs)
        return reply(msg, {"kind": type(dist).__name__}, distribution_arrays(dist))

    def _select_action(self, msg: Message) -> Message:
        import torch

        self._check_estop()
        self._claim(msg.body.get("session"), take=False)
        obs = self._obs(msg, time_axis=False)
        t0 = time.perf_counter()
        with torch.inference_mode():
            action = self.policy.select_action(obs)
        action = action.detach().float().cpu().numpy() if hasattr(action, "detach") else \
            np.asarray(action, np.float32)
        return reply(msg, {"infer_ms": (time.perf_counter() - t0) * 1e3}, {"action": action})

    def _reset(self, msg: Message) -> Message:
        self._claim(msg.body.get("session"), take=True)
        self.policy.reset()
        return reply(msg)

    def _estop(self, msg: Message) -> Message:
        self.estop_reason = str(msg.body.get("reason", "estop"))[:200]
        return reply(msg, {"estopped": True})

    def _estop_release(self, msg: Message) -> Message:
        if msg.body.get("confirm") is not True:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "estop_release needs body {confirm: true}")
        self.estop_reason = None
        return reply(msg, {"estopped": False})


# ---------------------------------------------------------------------------- server process
def serve_checkpoint(checkpoint: str | Path, config: ServerConfig, device: str = "cpu",
                     torch_threads: int = 1) -> None:
    """Load ``checkpoint`` and serve it in this thread until SIGTERM / SIGINT."""
    import torch
    from embodied_distill.policies.base import load_policy

    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    policy, train_cfg, _ = load_policy(checkpoint, device=device)
    task = train_cfg.get("task", {}) if isinstance(train_cfg, dict) else {}
    server = PolicyServer(policy, config, extra_info={"checkpoint": str(Path(checkpoint).resolve()),
                                                      "task": task.get("name"), "env_id": task.get("env_id"),
                                                      "control_mode": task.get("control_mode")})

    def _stop(signum, frame):
        server.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    def _ready(s: RPCServer) -> None:
        print(READY_PREFIX + json.dumps({"address": s.address, "server_key": str(s.server_key_file or ""),
                                         "pid": os.getpid()}), flush=True)

    server.serve_forever(on_ready=_ready)


class ServerProcess:
    """A bridge server running as its own OS process (started with :func:`spawn_server_process`).

    ``address`` is the bound endpoint; ``close()`` sends SIGTERM, then SIGKILL after ``grace_s``.
    The child's output is drained in a thread (``output`` keeps the last lines) so it never blocks.
    """

    def __init__(self, proc: subprocess.Popen, address: str, info: dict[str, Any], output: deque[str]):
        self.proc, self.address, self.info, self.output = proc, address, info, output

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL, no clean-up (what a crash looks like to the peers)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def close(self, grace_s: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def spawn_server_process(module: str, overrides: list[str], ready_prefix: str = READY_PREFIX,
                         timeout_s: float = 120.0, env: Mapping[str, str] | None = None) -> ServerProcess:
    """Run ``python -m <module> <overrides...>`` and wait for its ready line; raises with its output if
    it exits or stays silent for ``timeout_s``."""
    cmd = [sys.executable, "-m", module, *overrides, f"hydra.run.dir={tempfile.gettempdir()}",
           "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", **dict(env or {})},
                            start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()
    output: deque[str] = deque(maxlen=200)

    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line.rstrip())
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, name=f"{module}-stdout", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            line = ""
        if line and line.startswith(ready_prefix):
            info = json.loads(line[len(ready_prefix):])
            return ServerProcess(proc, info["address"], info, output)
        if line is None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            tail = "\n".join(output)
            raise RuntimeError(f"{module} did not become ready (exit code {proc.returncode}):\n"
                               f"{tail[-4000:]}")


def spawn_policy_server(checkpoint: str | Path, config: ServerConfig | None = None, device: str = "cpu",
                        timeout_s: float = 120.0) -> ServerProcess:
    """Start ``python -m embodied_distill.real_robot.server`` for ``checkpoint``; returns once it serves."""
    cfg = config or ServerConfig(port=0)
    overrides = [f"checkpoint={Path(checkpoint).resolve()}", f"server.host={cfg.host}",
                 f"server.port={cfg.port}",
                 f"server.auth={str(cfg.auth).lower()}", f"server.max_message_bytes={cfg.max_message_bytes}",
                 f"device={device}"]
    if cfg.keys_dir is not None:
        overrides.append(f"server.keys_dir={Path(cfg.keys_dir).expanduser().resolve()}")
    return spawn_server_process("embodied_distill.real_robot.server", overrides, timeout_s=timeout_s)


def main() -> None:
    """Hydra entry point (``configs/deploy.yaml``): serve ``checkpoint`` with the ``server`` settings."""
    from embodied_distill.real_robot.deployment import hydra_entry

    hydra_entry(mode="serve")


if __name__ == "__main__":
    main()
