"""The safety layer between a policy and a robot: command filter, watchdog, e-stop.

:class:`SafetyFilter` turns any (Da,) policy output into a command the robot may execute. Per control
period, in this order of precedence:

1. **Non-finite rejection**: a NaN / inf anywhere (or a wrong shape, or a non-finite measured state)
   discards the whole action and holds: "delta" dims command no motion, "absolute" dims repeat the last
   safe target, the gripper keeps its last state (``RobotLimits.hold_command``).
2. **Command bounds** (``command_low/high``): always hold.
3. **Velocity** (``max_velocity * velocity_scale``): each dim's step per period is at most
   ``v_max * dt``; always holds.
4. **Position limits**: the end-effector workspace box for translation deltas (measured position +
   step stays inside), joint limits for joint dims. Always holds when the robot starts inside; a
   robot found outside is only allowed to move back toward the box (at most at ``v_max``).
5. **Acceleration** (``max_acceleration * acceleration_scale``): the step changes by at most
   ``a_max * dt^2`` per period. Yields to 3-4 when they conflict (the workspace wall wins over smooth
   braking); such periods are flagged ``ACCEL_OVERRIDDEN``, and a hold (1) is a deliberate stop.

Each constraint is an interval on the per-dim step, so the filter is an interval intersection:
deterministic, cheap, and easy to fuzz (``tests/real_robot/test_safety.py`` does, with hypothesis).

**Gripper debounce**: a request to open or close is read with a hysteresis band around the midpoint;
after the gripper changes state it keeps that state for ``gripper_min_dwell_steps`` periods (leading-
edge debounce: a clean grasp is sent at once, open/close chatter is suppressed); optionally a change
must also be requested for ``gripper_debounce_steps`` consecutive periods (trailing debounce, which
delays every change, so off by default), and values are snapped to open / closed when
``gripper_binary``.

:class:`Watchdog` stops the robot when no fresh action was commanded for ``watchdog_periods`` control
periods (its own thread, so it fires even when the control loop is blocked on a dead policy).
:class:`EStop` is a latched emergency stop, triggered from any thread, a POSIX signal (``SIGUSR1`` by
default, via a self-pipe so nothing unsafe runs inside the signal handler) or the network endpoint in
``estop.py``; its callbacks (``driver.stop``) run on a dedicated thread.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
from embodied_distill.real_robot.driver import RobotLimits, RobotObservation

log = logging.getLogger(__name__)


class SafetyFlag(enum.IntFlag):
    """Why a command differs from the policy's action (bit flags, logged per step)."""

    NONE = 0
    NONFINITE = 1          # NaN / inf in the action: held
    BAD_SHAPE = 2          # wrong action size: held
    BAD_STATE = 4          # non-finite measured position: held
    NO_ACTION = 8          # no action was available this period (late or failed inference): held
    HELD = 16              # the command is the hold command
    BOUNDS = 32            # clipped to command bounds
    VELOCITY = 64          # step clamped to the velocity limit
    POSITION = 128         # step clamped to the workspace / joint limits
    ACCELERATION = 256     # step clamped to the acceleration limit
    ACCEL_OVERRIDDEN = 512  # the acceleration limit yielded to velocity / position limits
    GRIPPER_DEBOUNCED = 1024  # a gripper change was requested but not (yet) committed
    GRIPPER_SNAPPED = 2048    # the gripper value was snapped to open / closed


@dataclasses.dataclass
class SafetyConfig:
    """Deployment-side safety settings (they can only tighten the robot's own limits)."""

    velocity_scale: float = 1.0
    """Fraction (0, 1] of the robot's max velocity that commands may use."""
    acceleration_scale: float = 1.0
    """Fraction (0, 1] of the robot's max acceleration that commands may use."""
    workspace_low: Sequence[float] | None = None
    """End-effector box lower corner (robot base frame, m), intersected with the robot's; None: robot's."""
    workspace_high: Sequence[float] | None = None
    """End-effector box upper corner; None: the robot's."""
    gripper_binary: bool = False
    """Snap gripper commands to the robot's open / closed values (else pass values that agree with the
    current state through)."""
    gripper_hysteresis: float = 0.1
    """Dead band (fraction of the closed..open range, in [0, 0.5)) around the midpoint: no change inside."""
    gripper_min_dwell_steps: int = 3
    """After a gripper change, further changes are ignored for this many periods (>= 0; 0: off)."""
    gripper_debounce_steps: int = 1
    """Consecutive periods (>= 1) a new gripper state must be requested before it is commanded (1: off)."""
    watchdog_periods: float = 2.0
    """Stop the robot when no fresh action was commanded for this many control periods (> 0)."""
    joint_margin: float = 0.02
    """rad; with end-effector control, a measured joint beyond its limit by more than this stops the robot."""

    def __post_init__(self):
        if not 0 < self.velocity_scale <= 1 or not 0 < self.acceleration_scale <= 1:
            raise ValueError("velocity_scale and acceleration_scale must be in (0, 1]")
        if not 0 <= self.gripper_hysteresis < 0.5:
            raise ValueError(f"gripper_hysteresis must be in [0, 0.5), got {self.gripper_hysteresis}")
        if self.gripper_debounce_steps < 1 or self.gripper_min_dwell_steps < 0:
            raise ValueError("gripper_debounce_steps must be >= 1 and gripper_min_dwell_steps >= 0")
        if self.watchdog_periods <= 0:
            raise ValueError("watchdog_periods must be > 0")
        if self.joint_margin < 0:
            raise ValueError("joint_margin must be >= 0")
        for name in ("workspace_low", "workspace_high"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(float(v) for v in value)
                if len(value) != 3:
                    raise ValueError(f"{name} must be xyz (3 values), got {value}")
                setattr(self, name, value)


@dataclasses.dataclass
class SafeCommand:
    """The filter's output for one period."""

    command: np.ndarray
    """(Da,) the command to send."""
    flags: SafetyFlag
    """What the filter changed."""

    @property
    def held(self) -> bool:
        return bool(self.flags & SafetyFlag.HELD)


def _intersect(lo: np.ndarray, hi: np.ndarray, c_lo: np.ndarray, c_hi: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersect [lo, hi] with [c_lo, c_hi] per dim. Where they are disjoint, keep the point of [lo, hi]
    closest to the constraint (the higher-priority interval wins). Returns (lo, hi, disjoint)."""
    new_lo, new_hi = np.maximum(lo, c_lo), np.minimum(hi, c_hi)
    disjoint = new_lo > new_hi
    point = np.where(c_hi < lo, lo, hi)  # constraint entirely below -> lo; entirely above -> hi
    return np.where(disjoint, point, new_lo), np.where(disjoint, point, new_hi), disjoint


class SafetyFilter:
    """Stateful per-period command filter (see the module docstring for the rules and their order).

    Call ``reset(position)`` at every episode start and ``filter(action, position)`` once per period.
    """

    def __init__(self, limits: RobotLimits, config: SafetyConfig | None = None):
        self.limits = limits
        self.config = config or SafetyConfig()
        self.dt = limits.period_s
        n = limits.action_dim
        self._delta, self._abs = limits.mask("delta"), limits.mask("absolute")
        self._grip = limits.mask("gripper")
        self._motion = self._delta | self._abs
        self.vmax = limits.max_velocity * self.config.velocity_scale
        self.amax = limits.max_acceleration * self.config.acceleration_scale
        self.pos_low, self.pos_high = limits.position_low.copy(), limits.position_high.copy()
        ws = list(limits.workspace_dims)
        if self.config.workspace_low is not None:
            if not ws:
                raise ValueError("workspace_low/high set but this robot has no end-effector workspace dims")
            self.pos_low[ws] = np.maximum(self.pos_low[ws], self.config.workspace_low)
        if self.config.workspace_high is not None:
            if not ws:
                raise ValueError("workspace_low/high set but this robot has no end-effector workspace dims")
            self.pos_high[ws] = np.minimum(self.pos_high[ws], self.config.workspace_high)
        if (self.pos_low > self.pos_high).any():
            raise ValueError(f"the safety workspace {self.config.workspace_low}.."
                             f"{self.config.workspace_high} does not overlap the robot's "
                             f"{limits.position_low}..{limits.position_high}")
        self._target = np.zeros(n)       # last safe target of "absolute" dims
        self._prev_step = np.zeros(n)    # last commanded physical step per motion dim
        self._last_command: np.ndarray | None = None
        self._grip_state: np.ndarray = np.ones(n, bool)  # True = open, per gripper dim
        self._grip_request = np.ones(n, bool)
        self._grip_count = np.zeros(n, int)
        self._grip_since = np.full(n, 10**9)  # periods since the last gripper change
        self.counts: dict[str, int] = {}

    # ------------------------------------------------------------------ state
    def reset(self, position: np.ndarray) -> None:
        """Start of an episode: targets from the measured ``position`` (Da,), robot at rest."""
        lim = self.limits
        pos = np.asarray(position, np.float64).reshape(-1)
        if pos.shape != (lim.action_dim,):
            raise ValueError(f"position must have {lim.action_dim} entries, got {pos.shape}")
        self._target = np.where(np.isfinite(pos), np.clip(pos, lim.command_low, lim.command_high), 0.0)
        self._prev_step = np.zeros(lim.action_dim)
        mid = (lim.gripper_open + lim.gripper_closed) / 2
        is_open = (pos >= mid) if lim.gripper_open >= lim.gripper_closed else (pos <= mid)
        self._grip_state = np.where(np.isfinite(pos), is_open, True)
        self._grip_request = self._grip_state.copy()
        self._grip_count = np.zeros(lim.action_dim, int)
        self._grip_since = np.full(lim.action_dim, 10**9)
        self._last_command = self._hold_vector()
        self.counts = {}

    def _hold_vector(self) -> np.ndarray:
        lim = self.limits
        hold = np.zeros(lim.action_dim)
        hold[self._abs] = self._target[self._abs]
        hold[self._grip] = np.where(self._grip_state, lim.gripper_open, lim.gripper_closed)[self._grip]
        return np.clip(hold, lim.command_low, lim.command_high)

    def hold(self, flags: SafetyFlag = SafetyFlag.NONE) -> SafeCommand:
        """The command that holds position (no motion, last targets, gripper unchanged)."""
        self._prev_step = np.zeros(self.limits.action_dim)
        cmd = self._hold_vector()
        self._last_command = cmd
        flags |= SafetyFlag.HELD
        self._count(flags)
        return SafeCommand(cmd, flags)

    def _count(self, flags: SafetyFlag) -> None:
        for f in SafetyFlag:
            if f and flags & f:
                self.counts[f.name] = self.counts.get(f.name, 0) + 1

    # ------------------------------------------------------------------ the filter
    def filter(self, action: np.ndarray, position: np.ndarray) -> SafeCommand:
        """(Da,) policy action + (Da,) measured position -> a command within every limit."""
        lim = self.limits
        try:
            a = np.asarray(action, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            return self.hold(SafetyFlag.BAD_SHAPE)
        if a.shape != (lim.action_dim,):
            return self.hold(SafetyFlag.BAD_SHAPE)
        if not np.isfinite(a).all():
            return self.hold(SafetyFlag.NONFINITE)
        pos = np.asarray(position, dtype=np.float64).reshape(-1)
        bounded_pos = self._delta & (np.isfinite(self.pos_low) | np.isfinite(self.pos_high))
        if pos.shape != (lim.action_dim,) or not np.isfinite(pos[bounded_pos]).all():
            return self.hold(SafetyFlag.BAD_STATE)
        flags = SafetyFlag.NONE

        # 2. command bounds
        clipped = np.clip(a, lim.command_low, lim.command_high)
        if (clipped != a).any():
            flags |= SafetyFlag.BOUNDS
        # desired physical step per motion dim, and the hard interval (bounds and velocity)
        scale = np.where(self._delta, lim.delta_scale, 1.0)
        base = np.where(self._abs, self._target, 0.0)  # where a step starts from, for absolute dims
        want = np.where(self._delta, clipped * scale, clipped - base)
        lo = np.where(self._delta, lim.command_low * scale, lim.command_low - base)
        hi = np.where(self._delta, lim.command_high * scale, lim.command_high - base)
        # 3. velocity
        vstep = self.vmax * self.dt
        lo, hi, _ = _intersect(lo, hi, -vstep, vstep)
        if ((want < -vstep) | (want > vstep))[self._motion].any():
            flags |= SafetyFlag.VELOCITY
        # 4. position limits, from the measured position (deltas) or the last target (absolute)
        at = np.where(self._abs, self._target, np.where(np.isfinite(pos), pos, 0.0))
        p_lo, p_hi = self.pos_low - at, self.pos_high - at
        lo, hi, _ = _intersect(lo, hi, p_lo, p_hi)
        if ((want < p_lo) | (want > p_hi))[self._motion].any():
            flags |= SafetyFlag.POSITION
        # 5. acceleration (lowest priority)
        astep = self.amax * self.dt * self.dt
        a_lo, a_hi = self._prev_step - astep, self._prev_step + astep
        lo, hi, disjoint = _intersect(lo, hi, a_lo, a_hi)
        if disjoint[self._motion].any():
            flags |= SafetyFlag.ACCEL_OVERRIDDEN
        elif ((want < a_lo) | (want > a_hi))[self._motion].any():
            flags |= SafetyFlag.ACCELERATION
        step = np.clip(want, lo, hi)
        cmd = np.where(self._delta, step / scale, base + step)

        # gripper: hysteresis + debounce (+ snap)
        if self._grip.any():
            cmd, gflags = self._gripper(clipped, cmd)
            flags |= gflags
        cmd = np.clip(cmd, lim.command_low, lim.command_high)  # rounding guard; a no-op in exact arithmetic
        if not np.isfinite(cmd).all():  # cannot happen with finite inputs; never send it anyway
            return self.hold(SafetyFlag.NONFINITE)
        self._prev_step = np.where(self._motion, np.where(self._delta, cmd * scale, cmd - base), 0.0)
        self._target = np.where(self._abs, cmd, self._target)
        self._last_command = cmd
        self._count(flags)
        return SafeCommand(cmd, flags)

    def _gripper(self, clipped: np.ndarray, cmd: np.ndarray) -> tuple[np.ndarray, SafetyFlag]:
        lim, cfg = self.limits, self.config
        flags = SafetyFlag.NONE
        span = lim.gripper_open - lim.gripper_closed
        u = (clipped - lim.gripper_closed) / span if span != 0 else np.ones_like(clipped)  # 1 open, 0 closed
        request = np.where(u > 0.5 + cfg.gripper_hysteresis, True,
                           np.where(u < 0.5 - cfg.gripper_hysteresis, False, self._grip_state))
        changing = self._grip & (request != self._grip_state)
        same_request = request == self._grip_request
        self._grip_count = np.where(changing, np.where(same_request, self._grip_count + 1, 1), 0)
        self._grip_request = np.where(self._grip, request, self._grip_request)
        self._grip_since = self._grip_since + 1
        commit = changing & (self._grip_count >= cfg.gripper_debounce_steps) & \
            (self._grip_since > cfg.gripper_min_dwell_steps)
        if (changing & ~commit).any():
            flags |= SafetyFlag.GRIPPER_DEBOUNCED
        self._grip_state = np.where(commit, request, self._grip_state)
        self._grip_count = np.where(commit, 0, self._grip_count)
        self._grip_since = np.where(commit, 0, self._grip_since)
        state_value = np.where(self._grip_state, lim.gripper_open, lim.gripper_closed)
        if cfg.gripper_binary:
            value = state_value
            if (self._grip & (clipped != state_value)).any():
                flags |= SafetyFlag.GRIPPER_SNAPPED
        else:  # pass the value through while it asks for the committed state; else hold that state
            value = np.where(request == self._grip_state, clipped, state_value)
        return np.where(self._grip, value, cmd), flags

    # ------------------------------------------------------------------ state monitoring
    def check_state(self, obs: RobotObservation) -> str | None:
        """A reason to stop the robot, or None: measured joints beyond their limits (+ ``joint_margin``)."""
        lim = self.limits
        joints = np.asarray(obs.joints, np.float64).reshape(-1)
        n = min(len(joints), len(lim.joint_low))
        if n == 0:
            return None
        q, lo, hi = joints[:n], lim.joint_low[:n], lim.joint_high[:n]
        if not np.isfinite(q).all():
            return "non-finite joint measurement"
        bad = np.flatnonzero((q < lo - self.config.joint_margin) | (q > hi + self.config.joint_margin))
        if len(bad):
            j = int(bad[0])
            return f"joint {j} at {q[j]:.3f} rad is outside its limits [{lo[j]:.3f}, {hi[j]:.3f}]"
        return None


# ---------------------------------------------------------------------------- watchdog
class Watchdog:
    """Calls ``on_trip(reason)`` once when ``feed()`` was not called for ``timeout_s`` while armed.

    Runs its own thread, which sleeps exactly until the current deadline, so it fires even when the
    thread that should feed it is blocked (a dead policy server, a hung driver call).
    """

    def __init__(self, timeout_s: float, on_trip: Callable[[str], None], name: str = "watchdog"):
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.timeout_s, self.on_trip, self.name = float(timeout_s), on_trip, name
        self._cond = threading.Condition()
        self._armed = False
        self._last_feed = 0.0
        self._closed = False
        self.tripped_at: float | None = None
        self.trip_reason: str | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def tripped(self) -> bool:
        return self.tripped_at is not None

    def arm(self) -> None:
        """Start watching (counts as a feed); clears a previous trip."""
        with self._cond:
            self._armed, self._last_feed = True, time.monotonic()
            self.tripped_at = self.trip_reason = None
            self._cond.notify()

    def feed(self) -> None:
        """A fresh action was commanded. Arms the watchdog on first use."""
        with self._cond:
            self._last_feed = time.monotonic()
            if not self._armed and self.tripped_at is None:
                self._armed = True
                self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._armed = False
            self._cond.notify()

    def reset(self) -> None:
        """Disarm and forget a previous trip (start of an episode); the next ``feed()`` arms it."""
        with self._cond:
            self._armed = False
            self.tripped_at = self.trip_reason = None
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed, self._armed = True, False
            self._cond.notify()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                if not self._armed:
                    self._cond.wait()
                    continue
                remaining = self._last_feed + self.timeout_s - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                self._armed = False
                self.tripped_at = time.monotonic()
                starved = self.tripped_at - self._last_feed
                self.trip_reason = f"{self.name}: no fresh action for {starved * 1e3:.0f} ms " \
                                   f"(limit {self.timeout_s * 1e3:.0f} ms)"
                reason = self.trip_reason
            try:
                self.on_trip(reason)
            except Exception:
                log.exception("%s: on_trip raised", self.name)


# ---------------------------------------------------------------------------- e-stop
class EStop:
    """A latched emergency stop. ``trigger(reason)`` from anywhere; callbacks run once, on the e-stop
    thread, in registration order (e.g. ``driver.stop``). ``install_signal_handlers()`` makes POSIX
    signals trigger it (default SIGUSR1); only the main thread may install them."""

    def __init__(self):
        self._event = threading.Event()
        self.reason: str | None = None
        self.triggered_at: float | None = None
        self._callbacks: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._wfd, False)
        self._previous: dict[int, object] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="estop", daemon=True)
        self._thread.start()

    @property
    def triggered(self) -> bool:
        return self._event.is_set()

    def add_callback(self, fn: Callable[[str], None]) -> None:
        with self._lock:
            self._callbacks.append(fn)

    def trigger(self, reason: str = "estop") -> None:
        """Latch the e-stop and run the callbacks (on the e-stop thread). Idempotent."""
        with self._lock:
            if self._event.is_set():
                return
            self.reason, self.triggered_at = str(reason), time.monotonic()
            self._event.set()
        self._wake(b"t")

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._event.wait(timeout_s)

    def _wake(self, byte: bytes) -> None:
        try:
            os.write(self._wfd, byte)
        except (BlockingIOError, OSError):
            pass

    def _on_signal(self, signum, frame) -> None:
        # async-signal-safe: one write to the self-pipe, no locks, no Python-level waiting
        self._wake(bytes([signum % 256 or 1]))

    def install_signal_handlers(self, signals: Sequence[int] = (signal.SIGUSR1,)) -> None:
        for sig in signals:
            self._previous[int(sig)] = signal.signal(sig, self._on_signal)

    def uninstall_signal_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _run(self) -> None:
        fired = False
        while True:
            select.select([self._rfd], [], [])
            try:
                data = os.read(self._rfd, 64)
            except OSError:
                return
            if not data or self._closed:
                return
            for b in data:
                if b not in (ord("t"), ord("c")):  # a signal number arrived through the pipe
                    name = signal.Signals(b).name if b in {s.value for s in signal.Signals} else str(b)
                    with self._lock:
                        if not self._event.is_set():
                            self.reason, self.triggered_at = f"signal {name}", time.monotonic()
                            self._event.set()
            if self._event.is_set() and not fired:
                fired = True
                with self._lock:
                    callbacks, reason = list(self._callbacks), self.reason or "estop"
                for fn in callbacks:
                    try:
                        fn(f"e-stop: {reason}")
                    except Exception:
                        log.exception("e-stop callback %r raised", fn)

    def close(self) -> None:
        self.uninstall_signal_handlers()
        self._closed = True
        self._wake(b"c")
        self._thread.join(5)
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass
