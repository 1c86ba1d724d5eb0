"""Robot-side process: serve a local driver to a remote control loop (``RemoteDriver``).

    python -m embodied_distill.real_robot.robot_server robot=sim task=pickcube [robot_server.port=5570]
    python -m embodied_distill.deploy mode=robot robot=sim task=pickcube     # the same

Prints ``ROBOT_SERVER_READY {"address": ...}`` once bound. Safety does not depend on the far side:

* **Ownership**: ``home`` claims the robot for a session; only that session may ``command`` (others get
  ``busy``) until it releases, goes idle past ``session_timeout_s``, or the watchdog trips.
* **Watchdog**: after the first command following ``home``, no command for ``watchdog_periods`` control
  periods stops the robot (the deploy process died, or the network did).
* **Filter**: every command passes a :class:`~safety.SafetyFilter` here too (no gripper debounce, that
  is the deploy side's job), so a buggy or compromised client cannot exceed the robot's limits.
* **Staleness**: a command referring to an observation more than ``max_command_lag`` periods old is
  refused (``stale``), so a delayed packet never moves the robot.
* ``stop`` and ``estop`` are accepted from any authenticated client; after ``estop`` the robot stays
  stopped (``home`` refused) until ``estop_release`` with ``{confirm: true}``.

Message types: ``hello`` (limits + clock), ``home`` ({session, seed}), ``observe``, ``command``
({session, seq}, ``action`` (Da,)), ``stop`` ({reason}), ``estop`` ({reason}), ``estop_release``,
``release`` ({session}), ``ping``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

from embodied_distill.real_robot.driver import RobotDriver
from embodied_distill.real_robot.protocol import ErrorCode, Message, ProtocolError, reply
from embodied_distill.real_robot.rpc import RPCServer, ServerConfig
from embodied_distill.real_robot.safety import SafetyConfig, SafetyFilter, Watchdog

READY_PREFIX = "ROBOT_SERVER_READY "


class RobotServer(RPCServer):
    """Serves ``driver`` (see the module docstring)."""

    name = "robot"
    error_code = ErrorCode.DRIVER_ERROR

    def __init__(self, driver: RobotDriver, config: ServerConfig | None = None, watchdog_periods: float = 2.0,
                 max_command_lag: int = 2, session_timeout_s: float = 5.0,
                 safety: SafetyConfig | None = None):
        super().__init__(config)
        if max_command_lag < 0 or session_timeout_s <= 0:
            raise ValueError("max_command_lag must be >= 0 and session_timeout_s > 0")
        self.driver = driver
        self._limits = driver.limits()
        self.max_command_lag = int(max_command_lag)
        self.session_timeout_s = float(session_timeout_s)
        gripper_free = SafetyConfig(gripper_binary=False, gripper_debounce_steps=1, gripper_min_dwell_steps=0)
        self.filter = SafetyFilter(self._limits, safety or gripper_free)
        self.watchdog = Watchdog(watchdog_periods * self._limits.period_s, self._on_watchdog,
                                 "robot-watchdog")
        self._lock = threading.Lock()  # the watchdog thread touches the session too
        self._session: str | None = None
        self._session_seen = 0.0
        self.estop_reason: str | None = None
        self.last_command_at: float | None = None
        self.handlers.update(hello=self._hello, home=self._home, observe=self._observe, command=self._command,
                             stop=self._stop_handler, estop=self._estop, estop_release=self._estop_release,
                             release=self._release)

    def _on_watchdog(self, reason: str) -> None:
        self.driver.stop(reason)
        with self._lock:
            self._session = None

    def _owner(self, session: Any, claim: bool) -> None:
        if not isinstance(session, str) or not 0 < len(session) <= 128:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "body.session must be a string of 1-128 characters")
        now = time.monotonic()
        with self._lock:
            idle = now - self._session_seen > self.session_timeout_s
            if self._session not in (None, session) and not idle:
                raise ProtocolError(ErrorCode.BUSY, "the robot is controlled by another session")
            if self._session != session and not claim:
                raise ProtocolError(ErrorCode.BUSY, "this session does not own the robot; call home first")
            self._session, self._session_seen = session, now

    # ------------------------------------------------------------------ handlers
    def _hello(self, msg: Message) -> Message:
        body, arrays = self._limits.to_wire()
        return reply(msg, {"limits": body, "time": time.monotonic(), "robot": type(self.driver).__name__,
                           "watchdog_s": self.watchdog.timeout_s}, arrays)

    def _obs_reply(self, msg: Message, obs) -> Message:
        body, arrays = obs.to_wire()
        body["info"] = {**body["info"], "server_estopped": self.estop_reason is not None,
                        "robot_watchdog_tripped_at": self.watchdog.tripped_at,
                        "last_command_at": self.last_command_at}
        return reply(msg, body, arrays)

    def _home(self, msg: Message) -> Message:
        if self.estop_reason is not None:
            raise ProtocolError(ErrorCode.ESTOPPED, f"robot e-stopped ({self.estop_reason}); "
                                                    "send estop_release with confirm=true first")
        self._owner(msg.body.get("session"), claim=True)
        self.watchdog.reset()
        seed = msg.body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "body.seed must be an integer or null")
        obs = self.driver.home(seed)
        self.filter.reset(obs.position)
        self.last_command_at = None
        return self._obs_reply(msg, obs)

    def _observe(self, msg: Message) -> Message:
        return self._obs_reply(msg, self.driver.observe())

    def _command(self, msg: Message) -> Message:
        self._owner(msg.body.get("session"), claim=False)
        action = msg.arrays.get("action")
        if action is None or action.shape != (self._limits.action_dim,):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"command needs an 'action' array of shape "
                                                       f"({self._limits.action_dim},)")
        obs = self.driver.observe()
        seq = msg.body.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool) and obs.seq - seq > self.max_command_lag:
            raise ProtocolError(ErrorCode.STALE, f"command for observation {seq} arrived at {obs.seq} "
                                                 f"(> {self.max_command_lag} periods late); not executed")
        safe = self.filter.filter(action, obs.position)
        self.driver.command(safe.command, seq)
        self.last_command_at = time.monotonic()
        if not safe.held:
            self.watchdog.feed()
        return reply(msg, {"flags": int(safe.flags)})

    def _stop_handler(self, msg: Message) -> Message:
        self.driver.stop(f"remote stop: {str(msg.body.get('reason', 'stop'))[:200]}")
        self.watchdog.disarm()
        return reply(msg, {"stopped": True})

    def _estop(self, msg: Message) -> Message:
        self.estop_reason = str(msg.body.get("reason", "estop"))[:200]
        self.driver.stop(f"e-stop: {self.estop_reason}")
        self.watchdog.disarm()
        return reply(msg, {"estopped": True})

    def _estop_release(self, msg: Message) -> Message:
        if msg.body.get("confirm") is not True:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "estop_release needs body {confirm: true}")
        self.estop_reason = None
        return reply(msg, {"estopped": False})

    def _release(self, msg: Message) -> Message:
        with self._lock:
            if msg.body.get("session") == self._session:
                self._session = None
                self.watchdog.disarm()
        return reply(msg)

    def close(self) -> None:
        self.stop()
        self.watchdog.close()


def serve_robot(driver: RobotDriver, config: ServerConfig, watchdog_periods: float = 2.0,
                max_command_lag: int = 2) -> None:
    """Serve ``driver`` in this thread until SIGTERM / SIGINT, then stop the robot and close it."""
    server = RobotServer(driver, config, watchdog_periods=watchdog_periods, max_command_lag=max_command_lag)

    def _stop(signum, frame):
        server.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    def _ready(s: RPCServer) -> None:
        print(READY_PREFIX + json.dumps({"address": s.address, "server_key": str(s.server_key_file or ""),
                                         "pid": os.getpid(), "control_hz": driver.limits().control_hz}),
              flush=True)

    try:
        server.serve_forever(on_ready=_ready)
    finally:
        try:
            driver.stop("robot server shutting down")
        finally:
            server.watchdog.close()
            driver.close()


def main() -> None:
    """Hydra entry point (``configs/deploy.yaml``, mode=robot)."""
    from embodied_distill.real_robot.deployment import hydra_entry

    hydra_entry(mode="robot")


if __name__ == "__main__":
    main()

