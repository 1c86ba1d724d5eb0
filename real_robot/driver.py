"""Robot drivers: one small protocol, and the robots behind it.

``RobotDriver`` is what the control loop talks to::

    limits()              -> RobotLimits        what the robot accepts and how fast it may move
    home(seed)            -> RobotObservation   go to the start pose (a simulator resets its episode)
    observe()             -> RobotObservation   the latest state, non-blocking
    command(action, seq)                        set the target of the current control period, non-blocking
    stop(reason)                                stop now and hold; commands are ignored until home()
    close()

Drivers here:

* :class:`SimDriver`: a ManiSkill env behind the protocol, run **in real time**: a physics thread steps
  the env once per control period with the latest command, like a robot controller does. A period
  with no new command holds position (counted as ``missed_periods``). After ``home()`` the robot rests
  until the first command, then steps ``phase`` of a period after it and every period from there, so a
  loop running at the same rate meets its deadlines with half a period of slack either way.
  ``realtime=False`` steps the env inside ``command()`` instead (deterministic, for tests).
* :class:`PointMassDriver`: a 3-D end-effector point with a gripper, same real-time machinery, no
  simulator dependency (fast tests and dry runs).
* :class:`RemoteDriver`: a robot-side process (``robot_server.py``) over the authenticated network link.
* ``template_driver.py``: a documented template for a real arm's Python SDK.

Conventions. A command is a (Da,) float vector. ``RobotLimits.dim_kinds`` says what each dimension
means: ``"delta"`` (a step of a controlled position, e.g. end-effector translation, in command units
times ``delta_scale``), ``"absolute"`` (a position target, e.g. a joint angle) or ``"gripper"``.
``RobotObservation.position`` is the (Da,) current value of what each dimension controls (end-effector
xyz in the robot base frame for translation deltas, joint angles for joint dims, the gripper opening in
command units), which is what the safety layer checks limits against.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import queue
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

DIM_KINDS = ("delta", "absolute", "gripper")


def _vec(x: Any, n: int, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have {n} entries, got shape {arr.shape}")
    return arr


@dataclasses.dataclass
class RobotLimits:
    """What a robot accepts and how fast it may move (the safety layer enforces all of it)."""

    control_hz: float
    """The robot's control rate: one command per period of 1/control_hz seconds."""
    dim_kinds: tuple[str, ...]
    """Per command dim: "delta" (a position step), "absolute" (a position target) or "gripper"."""
    command_low: np.ndarray
    """(Da,) lowest value the robot accepts per command dim."""
    command_high: np.ndarray
    """(Da,) highest value the robot accepts per command dim."""
    delta_scale: np.ndarray
    """(Da,) physical units per command unit for "delta" dims (m or rad per step); 1 elsewhere."""
    position_low: np.ndarray
    """(Da,) lower limit of the controlled position (workspace in m, joint limit in rad); -inf: none."""
    position_high: np.ndarray
    """(Da,) upper limit of the controlled position; +inf: none."""
    max_velocity: np.ndarray
    """(Da,) fastest allowed change of the controlled position, units/s (inf: none)."""
    max_acceleration: np.ndarray
    """(Da,) largest allowed change of that velocity, units/s^2 (inf: none)."""
    gripper_open: float = 1.0
    """Command value that opens the gripper."""
    gripper_closed: float = -1.0
    """Command value that closes the gripper."""
    workspace_dims: tuple[int, ...] = ()
    """Indices of the dims whose position is the end-effector xyz (the safety workspace box applies)."""
    joint_low: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    """(J,) measured joint limits, for monitoring (empty when unknown)."""
    joint_high: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    """(J,) measured joint limits, for monitoring."""

    def __post_init__(self):
        self.dim_kinds = tuple(self.dim_kinds)
        n = len(self.dim_kinds)
        if n < 1 or any(k not in DIM_KINDS for k in self.dim_kinds):
            raise ValueError(f"dim_kinds must be a non-empty sequence of {DIM_KINDS}, got {self.dim_kinds}")
        if not 0 < self.control_hz <= 10_000:
            raise ValueError(f"control_hz must be in (0, 10000], got {self.control_hz}")
        for name in ("command_low", "command_high", "delta_scale", "position_low", "position_high",
                     "max_velocity", "max_acceleration"):
            setattr(self, name, _vec(getattr(self, name), n, name))
        self.joint_low = np.asarray(self.joint_low, np.float64).reshape(-1)
        self.joint_high = np.asarray(self.joint_high, np.float64).reshape(-1)
        self.workspace_dims = tuple(int(i) for i in self.workspace_dims)
        if not (np.isfinite(self.command_low).all() and np.isfinite(self.command_high).all()) or \
                (self.command_low > self.command_high).any():
            raise ValueError("command_low/high must be finite with low <= high")
        if (self.position_low > self.position_high).any() or np.isnan(self.position_low).any() or \
                np.isnan(self.position_high).any():
            raise ValueError("position_low must be <= position_high (use +-inf for none)")
        if not (self.delta_scale > 0).all() or not np.isfinite(self.delta_scale).all():
            raise ValueError("delta_scale must be finite and > 0")
        if not ((self.max_velocity > 0).all() and (self.max_acceleration > 0).all()):
            raise ValueError("max_velocity and max_acceleration must be > 0 (inf for none)")
        delta = np.array([k == "delta" for k in self.dim_kinds])
        if ((self.command_low > 0) | (self.command_high < 0))[delta].any():
            raise ValueError("delta dims must accept 0 (no motion) within command_low/high")
        if self.joint_low.shape != self.joint_high.shape:
            raise ValueError("joint_low and joint_high must have the same length")
        if any(not 0 <= i < n or self.dim_kinds[i] != "delta" for i in self.workspace_dims):
            raise ValueError("workspace_dims must index 'delta' dims")

    @property
    def action_dim(self) -> int:
        return len(self.dim_kinds)

    @property
    def period_s(self) -> float:
        return 1.0 / self.control_hz

    def mask(self, kind: str) -> np.ndarray:
        """(Da,) bool: the dims of ``kind``."""
        return np.array([k == kind for k in self.dim_kinds])

    def hold_command(self, last_command: np.ndarray | None, position: np.ndarray | None) -> np.ndarray:
        """(Da,) the command that holds position: 0 for deltas, the last target (else the measured
        position) for absolute dims, the last gripper command (else open)."""
        hold = np.zeros(self.action_dim)
        ab, gr = self.mask("absolute"), self.mask("gripper")
        base = last_command if last_command is not None else position
        if base is not None:
            base = np.asarray(base, np.float64).reshape(-1)
            hold[ab] = base[ab]
        hold[gr] = last_command[gr] if last_command is not None else self.gripper_open
        hold = np.where(np.isfinite(hold), hold, 0.0)
        return np.clip(hold, self.command_low, self.command_high)

    # ------------------------------------------------------------------ wire form
    def to_wire(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        body = {"control_hz": self.control_hz, "dim_kinds": list(self.dim_kinds),
                "gripper_open": self.gripper_open, "gripper_closed": self.gripper_closed,
                "workspace_dims": list(self.workspace_dims)}
        arrays = {f"limits.{n}": np.asarray(getattr(self, n), np.float64)
                  for n in ("command_low", "command_high", "delta_scale", "position_low", "position_high",
                            "max_velocity", "max_acceleration", "joint_low", "joint_high")}
        return body, arrays

    @classmethod
    def from_wire(cls, body: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> RobotLimits:
        names = ("command_low", "command_high", "delta_scale", "position_low", "position_high",
                 "max_velocity", "max_acceleration", "joint_low", "joint_high")
        fields = {n: arrays[f"limits.{n}"] for n in names}
        return cls(control_hz=float(body["control_hz"]), dim_kinds=tuple(body["dim_kinds"]),
                   gripper_open=float(body["gripper_open"]), gripper_closed=float(body["gripper_closed"]),
                   workspace_dims=tuple(body["workspace_dims"]), **fields)


@dataclasses.dataclass
class RobotObservation:
    """One state sample of the robot."""

    data: dict[str, np.ndarray]
    """Policy observation keys for this step, e.g. ``{"state": (Ds,)}``."""
    position: np.ndarray
    """(Da,) current value of what each command dim controls (see the module docstring)."""
    joints: np.ndarray
    """(J,) measured joint positions (empty when not available)."""
    seq: int
    """Control periods since home() (0 = the home state)."""
    stamp: float
    """``time.monotonic()`` when the state was sampled (converted to this machine's clock by RemoteDriver)."""
    success: bool | None = None
    """Task success flag when the robot can tell (a simulator), else None."""
    done: bool = False
    """The episode reached the robot's step limit (simulators); the robot rests until home()."""
    stopped: bool = False
    """The robot is stopped (stop(), e-stop or its own watchdog); commands are ignored until home()."""
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Counters and status: missed_periods, overruns, ignored_commands, stop_reason, stopped_at, ..."""

    def to_wire(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        body = {"seq": self.seq, "stamp": self.stamp, "success": self.success, "done": self.done,
                "stopped": self.stopped, "info": self.info}
        arrays = {f"obs.{k}": v for k, v in self.data.items()}
        arrays.update(position=np.asarray(self.position, np.float64),
                      joints=np.asarray(self.joints, np.float64))
        return body, arrays

    @classmethod
    def from_wire(cls, body: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                  clock_offset: float = 0.0) -> RobotObservation:
        return cls(data={k[4:]: v for k, v in arrays.items() if k.startswith("obs.")},
                   position=arrays["position"], joints=arrays["joints"], seq=int(body["seq"]),
                   stamp=float(body["stamp"]) - clock_offset, success=body.get("success"),
                   done=bool(body.get("done", False)), stopped=bool(body.get("stopped", False)),
                   info=dict(body.get("info", {})))


@runtime_checkable
class RobotDriver(Protocol):
    """The control loop's view of a robot (see the module docstring)."""

    def limits(self) -> RobotLimits: ...
    def home(self, seed: int | None = None) -> RobotObservation: ...
    def observe(self) -> RobotObservation: ...
    def command(self, action: np.ndarray, seq: int | None = None) -> None: ...
    def stop(self, reason: str = "stop") -> None: ...
    def close(self) -> None: ...


# ---------------------------------------------------------------------------- real-time simulated robots
class RealTimeSimDriver:
    """Base of simulated robots stepped at ``control_hz`` by their own physics thread (see module doc).

    Subclasses implement, all called from one thread (the physics thread, or the caller's thread when
    ``realtime=False``): ``_build()``, ``_make_limits() -> RobotLimits``, ``_reset(seed)``,
    ``_step(command)`` and ``_read() -> (data, position, joints, success)``, and ``_teardown()``.

    Args:
        control_hz: steps per second of wall-clock time.
        max_episode_steps: the episode ends (``done``) after this many steps; the robot then rests.
        realtime: step in a physics thread at ``control_hz`` (True) or inside ``command()`` (False).
        phase: in real time, the first step happens ``phase`` periods after the first command
            (0 < phase < 1).
        log_commands: how many received commands to keep in ``received`` (for tests and audits).
    """

    def __init__(self, control_hz: float, max_episode_steps: int, realtime: bool = True, phase: float = 0.5,
                 log_commands: int = 10_000):
        if not 0 < control_hz <= 1000:
            raise ValueError(f"control_hz must be in (0, 1000], got {control_hz}")
        if max_episode_steps < 1:
            raise ValueError("max_episode_steps must be >= 1")
        if not 0 < phase < 1:
            raise ValueError(f"phase must be in (0, 1), got {phase}")
        self.control_hz, self.max_episode_steps = float(control_hz), int(max_episode_steps)
        self.realtime, self.phase = bool(realtime), float(phase)
        self.period_s = 1.0 / self.control_hz
        self.received: deque[tuple[float, int | None, np.ndarray]] = deque(maxlen=log_commands)
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._pending: np.ndarray | None = None
        self._pending_id = self._applied_id = 0
        self._last_applied: np.ndarray | None = None
        self._obs: RobotObservation | None = None
        self._seq = 0
        self._stopped, self._stop_reason, self._stopped_at = False, None, None
        self._running = False  # stepping (after the first command following home)
        self._closed = False
        self._limits: RobotLimits | None = None
        self._requests: queue.Queue[tuple[str, Any, concurrent.futures.Future]] = queue.Queue()
        self._next_step: float | None = None
        self._thread: threading.Thread | None = None
        self._physics_error: BaseException | None = None
        if self.realtime:
            ready: concurrent.futures.Future = concurrent.futures.Future()
            self._thread = threading.Thread(target=self._physics, args=(ready,), name="sim-physics",
                                            daemon=True)
            self._thread.start()
            ready.result(timeout=300)
        else:
            self._build()
            self._limits = self._make_limits()

    # ------------------------------------------------------------------ subclass hooks
    def _build(self) -> None:
        raise NotImplementedError

    def _make_limits(self) -> RobotLimits:
        raise NotImplementedError

    def _reset(self, seed: int | None) -> None:
        raise NotImplementedError

    def _step(self, command: np.ndarray) -> None:
        raise NotImplementedError

    def _read(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, bool | None]:
        raise NotImplementedError

    def _teardown(self) -> None:
        pass

    # ------------------------------------------------------------------ RobotDriver
    def limits(self) -> RobotLimits:
        assert self._limits is not None
        return self._limits

    def home(self, seed: int | None = None) -> RobotObservation:
        if self._closed:
            raise RuntimeError("driver is closed")
        if self._physics_error is not None:
            raise RuntimeError(f"the simulated robot's physics thread died: {self._physics_error!r}")
        if not self.realtime:
            self._do_home(seed)
        else:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            self._requests.put(("home", seed, fut))
            fut.result(timeout=60)
        return self.observe()

    def observe(self) -> RobotObservation:
        if self._physics_error is not None:
            raise RuntimeError(f"the simulated robot's physics thread died: {self._physics_error!r}")
        with self._lock:
            if self._obs is None:
                raise RuntimeError("call home() before observe()")
            obs = dataclasses.replace(self._obs, stopped=self._stopped,
                                      info={**self._obs.info, **self._status()})
        return obs

    def command(self, action: np.ndarray, seq: int | None = None) -> None:
        """Set the target of the current period (the latest command wins). Non-finite commands are ignored
        and out-of-range ones clipped: the robot's last line of defence, counted in ``info``."""
        now = time.monotonic()
        lim = self.limits()
        cmd = np.array(action, dtype=np.float64).reshape(-1)
        self.received.append((now, seq, cmd.copy()))
        if cmd.shape != (lim.action_dim,) or not np.isfinite(cmd).all():
            self.counters["rejected_commands"] += 1
            return
        if (cmd < lim.command_low).any() or (cmd > lim.command_high).any():
            self.counters["out_of_limit_commands"] += 1
            cmd = np.clip(cmd, lim.command_low, lim.command_high)
        start = False
        with self._lock:
            if self._stopped or self._obs is None or self._obs.done:
                self.counters["ignored_commands"] += 1
                return
            self._pending, self._pending_id = cmd, self._pending_id + 1
            if self.realtime and not self._running:
                self._running, start = True, True
        if not self.realtime:
            self._do_step()
        elif start:
            self._requests.put(("start", now, concurrent.futures.Future()))

    def stop(self, reason: str = "stop") -> None:
        with self._lock:
            if not self._stopped:
                self._stopped, self._stop_reason, self._stopped_at = True, str(reason), time.monotonic()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            fut: concurrent.futures.Future = concurrent.futures.Future()
            self._requests.put(("close", None, fut))
            self._thread.join(30)
        else:
            self._teardown()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _status(self) -> dict[str, Any]:
        return {**dict(self.counters), "stop_reason": self._stop_reason, "stopped_at": self._stopped_at,
                "running": self._running}

    def _publish(self) -> None:
        data, position, joints, success = self._read()
        obs = RobotObservation(data=data, position=np.asarray(position, np.float64),
                               joints=np.asarray(joints, np.float64), seq=self._seq, stamp=time.monotonic(),
                               success=success, done=self._seq >= self.max_episode_steps)
        with self._lock:
            self._obs = obs

    def _do_home(self, seed: int | None) -> None:
        self._reset(seed)
        with self._lock:
            self._seq, self._pending, self._last_applied = 0, None, None
            self._applied_id = self._pending_id
            self._stopped, self._stop_reason, self._stopped_at = False, None, None
            self._running = False
            self.counters.clear()
        self._next_step = None
        self._publish()

    def _do_step(self) -> None:
        lim = self.limits()
        with self._lock:
            fresh = self._pending_id != self._applied_id
            cmd = self._pending if fresh else None
            self._applied_id = self._pending_id
            stopped = self._stopped
        if stopped or cmd is None:
            if not stopped:
                self.counters["missed_periods"] += 1
            position = self._obs.position if self._obs is not None else None
            cmd = lim.hold_command(self._last_applied, position)
        self._step(cmd)
        self._last_applied = cmd
        self._seq += 1
        self._publish()

    def _physics(self, ready: concurrent.futures.Future) -> None:
        try:
            self._build()
            self._limits = self._make_limits()
        except BaseException as e:
            ready.set_exception(e)
            return
        ready.set_result(True)
        try:
            while True:
                timeout = 0.1 if self._next_step is None else self._next_step - time.monotonic()
                if timeout > 0:
                    try:
                        kind, arg, fut = self._requests.get(timeout=timeout)
                    except queue.Empty:
                        continue  # idle: wait again; running: the step is due now
                    if kind == "close":
                        fut.set_result(True)
                        return
                    self._handle_request(kind, arg, fut)
                    continue
                try:
                    self._do_step()
                except BaseException as e:  # surface it to observe(); the robot can no longer move
                    self._physics_error = e
                    return
                if self._seq >= self.max_episode_steps:
                    self._next_step = None  # episode over: rest until home()
                    continue
                if self._next_step is None:  # a home() raced with the step; wait for the next command
                    continue
                self._next_step += self.period_s
                late = time.monotonic() - self._next_step
                if late > 0:  # the step overran a whole period: skip the missed ones, keep the phase
                    skipped = math.ceil(late / self.period_s)
                    self.counters["overruns"] += skipped
                    self._next_step += skipped * self.period_s
        finally:
            self._teardown()

    def _handle_request(self, kind: str, arg: Any, fut: concurrent.futures.Future) -> None:
        try:
            if kind == "home":
                self._do_home(arg)
            elif kind == "start":
                if self._running and self._next_step is None and self._seq < self.max_episode_steps:
                    self._next_step = float(arg) + self.phase * self.period_s
            fut.set_result(True)
        except BaseException as e:
            fut.set_exception(e)


class PointMassDriver(RealTimeSimDriver):
    """A point end-effector with a gripper that must reach a goal; no simulator needed.

    Commands are 7-D like ManiSkill's ``pd_ee_delta_pose``: xyz steps (``step_m`` metres per unit),
    three rotation steps (integrated, not used for success) and a gripper value in [-1, 1].
    ``state`` = [ee xyz (3), gripper (1), goal xyz (3)]. Success: within 2 cm of the goal.

    The dynamics do **not** clip to the workspace, so a command that would leave it is visible in
    ``workspace_violations`` (the safety layer must prevent it). ``task`` is accepted for symmetry with
    the other drivers and ignored.
    """

    def __init__(self, task: Mapping[str, Any] | None = None, *, control_hz: float = 20.0,
                 max_episode_steps: int = 50, realtime: bool = True, phase: float = 0.5, step_m: float = 0.05,
                 workspace_low: Sequence[float] = (-0.3, -0.3, 0.0),
                 workspace_high: Sequence[float] = (0.3, 0.3, 0.4), max_speed: float | None = None,
                 max_accel: float | None = None):
        self.step_m = float(step_m)
        self.workspace_low = np.asarray(workspace_low, np.float64)
        self.workspace_high = np.asarray(workspace_high, np.float64)
        self.max_speed = max_speed
        self.max_accel = max_accel
        super().__init__(control_hz, max_episode_steps, realtime, phase)

    def _build(self) -> None:
        self._rng = np.random.default_rng(0)
        self._pos = np.zeros(3)
        self._rot = np.zeros(3)
        self._grip = 1.0
        self._goal = np.zeros(3)

    def _make_limits(self) -> RobotLimits:
        inf = np.inf
        speed = self.max_speed if self.max_speed is not None else self.step_m * self.control_hz
        accel = self.max_accel if self.max_accel is not None else inf
        return RobotLimits(
            control_hz=self.control_hz, dim_kinds=("delta",) * 6 + ("gripper",),
            command_low=-np.ones(7), command_high=np.ones(7),
            delta_scale=[self.step_m] * 3 + [0.1] * 3 + [1.0],
            position_low=[*self.workspace_low, -inf, -inf, -inf, -inf],
            position_high=[*self.workspace_high, inf, inf, inf, inf],
            max_velocity=[speed] * 3 + [2.0] * 3 + [inf], max_acceleration=[accel] * 3 + [inf] * 4,
            workspace_dims=(0, 1, 2))

    def _reset(self, seed: int | None) -> None:
        rng = np.random.default_rng(seed)
        span = 0.6 * (self.workspace_high - self.workspace_low) / 2
        center = (self.workspace_high + self.workspace_low) / 2
        self._pos = center + rng.uniform(-span, span)
        self._goal = center + rng.uniform(-span, span)
        self._rot = np.zeros(3)
        self._grip = 1.0

    def _step(self, command: np.ndarray) -> None:
        self._pos = self._pos + command[:3] * self.step_m
        self._rot = self._rot + command[3:6] * 0.1
        self._grip = float(command[6])
        if (self._pos < self.workspace_low - 1e-9).any() or (self._pos > self.workspace_high + 1e-9).any():
            self.counters["workspace_violations"] += 1

    def _read(self):
        state = np.concatenate([self._pos, [self._grip], self._goal]).astype(np.float32)
        position = np.concatenate([self._pos, self._rot, [self._grip]])
        return {"state": state}, position, np.zeros(0), bool(np.linalg.norm(self._pos - self._goal) < 0.02)


# Franka Panda joint limits from its datasheet (rad/s, rad/s^2), used for joint-space control modes.
PANDA_JOINT_MAX_VELOCITY = (2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61)
PANDA_JOINT_MAX_ACCELERATION = (15.0, 7.5, 10.0, 12.5, 15.0, 20.0, 20.0)


class SimDriver(RealTimeSimDriver):
    """A ManiSkill task behind the RobotDriver protocol, stepped in real time at the env's control rate.

    Supports the control modes ``pd_ee_delta_pose`` (translation dims are "delta" with the workspace box,
    rotation dims "delta" without position limits), ``pd_joint_pos`` ("absolute" joint targets within
    the joint limits) and ``pd_joint_delta_pos`` ("delta" joint steps), each with a "gripper" dim.

    Args:
        task: a task config (``configs/task/<name>.yaml`` as a mapping): env_id, control_mode,
            max_episode_steps, robot_uids, obs_mode.
        realtime / phase: see :class:`RealTimeSimDriver`.
        workspace_low / workspace_high: end-effector box in the robot base frame (m), the robot's own
            limit; the safety config may only tighten it.
        ee_max_speed / ee_max_accel: end-effector translation limits (m/s, m/s^2); None: what the
            controller can be commanded (its per-step range times the rate) / unlimited.
        rot_max_speed / rot_max_accel: the same for rotation (rad/s, rad/s^2).
        render: build the env with rgb rendering (``render()`` returns a frame).
    """

    SUPPORTED_CONTROL_MODES = ("pd_ee_delta_pose", "pd_joint_pos", "pd_joint_delta_pos")

    def __init__(self, task: Mapping[str, Any] | None = None, *, realtime: bool = True, phase: float = 0.5,
                 workspace_low: Sequence[float] = (0.25, -0.45, 0.0),
                 workspace_high: Sequence[float] = (0.95, 0.45, 0.7),
                 ee_max_speed: float | None = None, ee_max_accel: float | None = None,
                 rot_max_speed: float | None = None, rot_max_accel: float | None = None,
                 render: bool = False):
        from embodied_distill.sim.maniskill import TASKS, ManiSkillEnvConfig

        task = dict(task or {"name": "pickcube"})
        env_id = task.get("env_id") or TASKS[task["name"]]
        self.env_cfg = ManiSkillEnvConfig(env_id=env_id, obs_mode=task.get("obs_mode", "state"),
                                          control_mode=task.get("control_mode", "pd_ee_delta_pose"),
                                          max_episode_steps=int(task.get("max_episode_steps", 50)),
                                          robot_uids=task.get("robot_uids", "panda"), sim_backend="cpu")
        if self.env_cfg.control_mode not in self.SUPPORTED_CONTROL_MODES:
            raise NotImplementedError(f"SimDriver supports control modes {self.SUPPORTED_CONTROL_MODES}, "
                                      f"not {self.env_cfg.control_mode!r}")
        self.workspace_low = np.asarray(workspace_low, np.float64)
        self.workspace_high = np.asarray(workspace_high, np.float64)
        if self.workspace_low.shape != (3,) or self.workspace_high.shape != (3,) or \
                (self.workspace_low >= self.workspace_high).any():
            raise ValueError("workspace_low/high must be xyz with low < high")
        self.ee_max_speed, self.ee_max_accel = ee_max_speed, ee_max_accel
        self.rot_max_speed, self.rot_max_accel = rot_max_speed, rot_max_accel
        self.render_enabled = render
        self.env = None
        # 20 Hz is a placeholder: _build() adopts the env's own control frequency before any step
        super().__init__(20.0, self.env_cfg.max_episode_steps, realtime, phase)

    def _build(self) -> None:
        from embodied_distill.sim.maniskill import make_single_env

        self.env = make_single_env(self.env_cfg, render=self.render_enabled)
        self._u = self.env.unwrapped
        self.control_hz = float(self._u.control_freq)
        self.period_s = 1.0 / self.control_hz
        self._last_obs = None
        self._success = False

    def _arm_cfg(self):
        return self._u.agent.controller.controllers["arm"].config

    def _make_limits(self) -> RobotLimits:
        inf, hz = np.inf, self.control_hz
        space = self.env.action_space
        low, high = np.asarray(space.low, np.float64), np.asarray(space.high, np.float64)
        qlim = self._u.agent.robot.get_qlimits()
        qlim = np.asarray(qlim.cpu().numpy() if hasattr(qlim, "cpu") else qlim).reshape(-1, 2)
        joint_low, joint_high = qlim[:7, 0], qlim[:7, 1]
        arm = self._arm_cfg()
        mode = self.env_cfg.control_mode
        if mode == "pd_ee_delta_pose":
            pos, rot = float(arm.pos_upper), float(arm.rot_upper)
            if abs(float(arm.pos_lower) + pos) > 1e-9 or abs(float(arm.rot_lower) + rot) > 1e-9:
                raise NotImplementedError("asymmetric pd_ee_delta_pose ranges are not supported")
            v = self.ee_max_speed if self.ee_max_speed is not None else pos * hz
            w = self.rot_max_speed if self.rot_max_speed is not None else rot * hz
            a = self.ee_max_accel if self.ee_max_accel is not None else inf
            b = self.rot_max_accel if self.rot_max_accel is not None else inf
            return RobotLimits(
                control_hz=hz, dim_kinds=("delta",) * 6 + ("gripper",), command_low=low, command_high=high,
                delta_scale=[pos] * 3 + [rot] * 3 + [1.0],
                position_low=[*self.workspace_low, -inf, -inf, -inf, -inf],
                position_high=[*self.workspace_high, inf, inf, inf, inf],
                max_velocity=[v] * 3 + [w] * 3 + [inf], max_acceleration=[a] * 3 + [b] * 3 + [inf],
                gripper_open=float(high[6]), gripper_closed=float(low[6]), workspace_dims=(0, 1, 2),
                joint_low=joint_low, joint_high=joint_high)
        n = len(low) - 1
        vmax = list(PANDA_JOINT_MAX_VELOCITY[:n]) + [inf]
        amax = list(PANDA_JOINT_MAX_ACCELERATION[:n]) + [inf]
        if mode == "pd_joint_pos":
            return RobotLimits(control_hz=hz, dim_kinds=("absolute",) * n + ("gripper",), command_low=low,
                               command_high=high, delta_scale=np.ones(n + 1),
                               position_low=[*joint_low[:n], -inf], position_high=[*joint_high[:n], inf],
                               max_velocity=vmax, max_acceleration=amax, gripper_open=float(high[n]),
                               gripper_closed=float(low[n]), joint_low=joint_low, joint_high=joint_high)
        step = float(arm.upper)
        return RobotLimits(control_hz=hz, dim_kinds=("delta",) * n + ("gripper",), command_low=low,
                           command_high=high, delta_scale=[step] * n + [1.0],
                           position_low=[*joint_low[:n], -inf], position_high=[*joint_high[:n], inf],
                           max_velocity=vmax, max_acceleration=amax, gripper_open=float(high[n]),
                           gripper_closed=float(low[n]), joint_low=joint_low, joint_high=joint_high)

    def _reset(self, seed: int | None) -> None:
        obs, _ = self.env.reset(seed=None if seed is None else int(seed))
        self._last_obs = np.asarray(obs, np.float32).reshape(-1)
        self._success = False

    def _step(self, command: np.ndarray) -> None:
        obs, _, _, _, info = self.env.step(command.astype(np.float32))
        self._last_obs = np.asarray(obs, np.float32).reshape(-1)
        self._success = bool(np.asarray(info.get("success", False)).reshape(-1)[0])

    def _read(self):
        u = self._u
        qpos = u.agent.robot.get_qpos()
        qpos = np.asarray(qpos.cpu().numpy() if hasattr(qpos, "cpu") else qpos, np.float64).reshape(-1)
        grip_cfg = u.agent.controller.controllers["gripper"].config
        finger = float(qpos[7]) if len(qpos) > 7 else 0.0
        grip = (finger - grip_cfg.lower) / (grip_cfg.upper - grip_cfg.lower) * 2 - 1  # in command units
        if self.env_cfg.control_mode == "pd_ee_delta_pose":
            rel = u.agent.robot.pose.inv() * u.agent.tcp.pose
            ee = np.asarray(rel.p.cpu().numpy(), np.float64).reshape(-1)[:3]
            position = np.concatenate([ee, np.zeros(3), [grip]])
        else:
            position = np.concatenate([qpos[:7], [grip]])
        return {"state": self._last_obs.copy()}, position, qpos[:7], self._success

    def render(self) -> np.ndarray:
        """(H, W, 3) uint8 frame (requires ``render=True``; call between steps in lock-step mode)."""
        frame = self.env.render()
        frame = frame.cpu().numpy() if hasattr(frame, "cpu") else np.asarray(frame)
        return frame.reshape(frame.shape[-3:]).astype(np.uint8)

    def _teardown(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


# ---------------------------------------------------------------------------- remote robot
class RemoteDriver:
    """A robot served by a robot-side process (``python -m embodied_distill.real_robot.robot_server``).

    Each call is one authenticated request. ``stop()`` travels on its own socket so it is never queued
    behind a slow request. The robot's clock is mapped to this machine's by the offset measured at
    connect time (the best of ``clock_probes`` round trips), so ``RobotObservation.stamp`` is local.
    The robot-side process runs its own watchdog: if this process dies, the robot stops.

    Args:
        task: accepted for symmetry with the other drivers (the robot side decides the task).
        address: ``tcp://ROBOT:PORT`` of the robot server.
        keys_dir / server_key / auth: as in ``ClientConfig``.
        timeout_s: reply deadline of one request (keep it within a few control periods).
    """

    def __init__(self, task: Mapping[str, Any] | None = None, *, address: str = "tcp://127.0.0.1:5570",
                 keys_dir: str | None = None, server_key: str | None = None, auth: bool = True,
                 timeout_s: float = 1.0, clock_probes: int = 5):
        from embodied_distill.real_robot.rpc import ClientConfig, RPCClient

        cfg = ClientConfig(address=address, auth=auth, keys_dir=keys_dir, server_key=server_key,
                           timeout_s=timeout_s)
        self.session = uuid.uuid4().hex
        self._rpc = RPCClient(cfg)
        self._stop_rpc = RPCClient(cfg)
        try:
            hello = self._rpc.call("hello", {"session": self.session})
            self._limits = RobotLimits.from_wire(hello.body["limits"], hello.arrays)
            self.robot_info = {k: v for k, v in hello.body.items() if k != "limits"}
            self.clock_offset = self._measure_clock_offset(clock_probes)
        except BaseException:
            self.close()
            raise

    def _measure_clock_offset(self, probes: int) -> float:
        best_rtt, offset = math.inf, 0.0
        for _ in range(max(1, probes)):
            t0 = time.monotonic()
            remote = float(self._rpc.call("ping").body["time"])
            t1 = time.monotonic()
            if t1 - t0 < best_rtt:
                best_rtt, offset = t1 - t0, remote - (t0 + t1) / 2
        return offset

    def limits(self) -> RobotLimits:
        return self._limits

    def home(self, seed: int | None = None) -> RobotObservation:
        rep = self._rpc.call("home", {"session": self.session, "seed": seed}, timeout_s=max(30.0, 1.0))
        return RobotObservation.from_wire(rep.body, rep.arrays, self.clock_offset)

    def observe(self) -> RobotObservation:
        rep = self._rpc.call("observe")
        return RobotObservation.from_wire(rep.body, rep.arrays, self.clock_offset)

    def command(self, action: np.ndarray, seq: int | None = None) -> None:
        self._rpc.call("command", {"session": self.session, "seq": seq},
                       {"action": np.asarray(action, np.float64).reshape(-1)})

    def stop(self, reason: str = "stop") -> None:
        self._stop_rpc.call("stop", {"reason": reason})

    def close(self) -> None:
        for name in ("_rpc", "_stop_rpc"):
            client = getattr(self, name, None)
            if client is not None:
                if name == "_rpc":
                    try:
                        client.call("release", {"session": self.session}, timeout_s=0.5)
                    except Exception:
                        pass
                client.close()
                setattr(self, name, None)
