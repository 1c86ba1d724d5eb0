"""Fixed-rate control loop: observe -> policy -> chunk strategy -> safety filter -> command, once per tick.

One tick (period ``P = 1 / rate_hz``, ticks scheduled at ``t0 + k P`` on the monotonic clock):

1. sleep until the tick's deadline; record the **jitter** (how late the tick started); a tick more than a
   period late is skipped (counted in ``overruns``), keeping the absolute tick index aligned with time;
2. stop if the e-stop or the watchdog fired, or the robot reports stopped / done; ``observe()``;
3. collect finished policy results and, when the strategy asks for one, request a new chunk for this
   tick's observation history (``(1, To, ...)``);
4. the strategy turns the chunks into this tick's action; the :class:`~safety.SafetyFilter` turns it into
   a command (or the hold command when there is none); ``command()``; a fresh, non-held command feeds
   the :class:`~safety.Watchdog`;
5. log the step; whole episodes go to a zarr :class:`~embodied_distill.data.episode_store.EpisodeStore`
   (diffusion_policy layout: the observation keys plus ``action`` = the executed command, so a deployment
   is training data; plus ``policy_action`` (NaN when none), ``safety_flags``, ``tick``, ``source_tick``
   (the tick whose observation produced the action, -1 when held), ``obs_seq``, ``obs_stamp``,
   ``command_time``, ``jitter_ms``, ``e2e_ms``, ``action_age_ms`` and ``fresh``; per episode ``seed``,
   ``success`` (1/0, -1 unknown) and ``end_reason``).

**Chunk strategies.** Every chunk is tagged with the tick ``t_obs`` of the observation it was computed
from; action ``j`` of the chunk belongs to tick ``t_obs + j``. Indexing by absolute tick is what aligns
late chunks with the measured latency: when a chunk arrives ``d`` ticks after its observation, its first
``d`` actions are already in the past and are skipped.

* ``open_loop``: execute ``n_action_steps`` actions of a chunk, then re-plan (diffusion_policy's scheme).
* ``temporal_ensemble``: re-plan every tick; the action for tick t is the average of every chunk's
  prediction for t, weighted ``exp(-m i)`` with ``i = 0`` the oldest chunk (ACT, Zhao et al. 2023).
* ``streaming``: an action buffer by tick; every ``stream_stride`` ticks a new chunk overwrites the future
  entries. With a policy that has its own per-step sampler (``policy.stateful_select_action``, e.g. a
  streaming diffusion policy that denoises its buffer one step per tick) the loop delegates instead:
  ``policy.select_action(obs_t)`` every tick, the sampler's state living in the policy.
* ``rti``: real-time-iteration warm start: like ``streaming``, and each request passes the previous chunk
  shifted to the new observation's tick as ``predict_action_chunk(obs, warm_start=(1, Ta, Da))`` when
  ``policy.supports_warm_start`` (a sampler can then start from it and run few steps); policies with a
  stateful sampler are delegated to as for ``streaming``; others simply get plain requests.

``async_inference`` (any chunk strategy) runs the policy in a background thread while the loop keeps
executing: the next chunk is requested ``ceil(latency / P) + latency_margin_ticks`` ticks before the
current plan runs out, the latency being a running average of measured round trips, and open-loop
execution may run past ``n_action_steps`` (up to the chunk's end) while a chunk is late. A policy whose
mean latency fits in ``async_tick_budget`` of a period is requested on time and waited for within that
tick (so a fast policy is not forced to skip the first action of every chunk), without blocking longer.

**Policy hooks** (all optional; ``RemotePolicy`` reports the served policy's): ``stateful_select_action``
(bool), ``supports_warm_start`` (bool, ``predict_action_chunk(obs, warm_start=...)``).

**Fresh action / watchdog.** An action is fresh when the strategy has a planned action for the tick (a
chunk computed at most ``Ta`` ticks ago covers it) and the filter did not have to hold. A failed policy
request (error, timeout, lost server) discards the whole plan, so the robot holds from that tick and
the watchdog stops it ``watchdog_periods`` after the last fresh action; a request that blocks (a dead
server mid-call) is covered by the watchdog's own thread. Open-loop execution does not need the policy
between re-plans, so it finishes the planned, filtered actions of the current chunk first.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from embodied_distill.real_robot.driver import RobotDriver, RobotObservation
from embodied_distill.real_robot.protocol import EStopError
from embodied_distill.real_robot.safety import EStop, SafetyConfig, SafetyFilter, SafetyFlag, Watchdog

STRATEGIES = ("open_loop", "temporal_ensemble", "streaming", "rti")


@dataclasses.dataclass
class ControlLoopConfig:
    """How the loop runs."""

    rate_hz: float | None = None
    """Ticks per second (1-500; robot arms run 10-50). None: the robot's own control rate."""
    max_steps: int | None = None
    """Ticks per episode (>= 1). None: until the robot reports done (a simulator's step limit) or a stop."""
    strategy: str = "open_loop"
    """Chunk execution: open_loop | temporal_ensemble | streaming | rti (see the module docstring)."""
    async_inference: bool = False
    """Compute the next chunk in a background thread while executing the current one."""
    n_action_steps: int | None = None
    """open_loop: actions executed per chunk (1..Ta); None: the policy's own n_action_steps."""
    ensemble_m: float = 0.01
    """temporal_ensemble: weight decay m >= 0 of exp(-m i) (i = 0 the oldest chunk)."""
    stream_stride: int = 1
    """streaming / rti: ticks between chunk requests (>= 1)."""
    latency_margin_ticks: int = 0
    """async: request this many ticks earlier than ceil(measured latency / period) requires (>= 0); a late
    chunk is covered by running on in the current one."""
    async_tick_budget: float = 0.5
    """async: a policy whose mean latency fits in this fraction of a period (in [0, 1)) is waited for
    within the tick that requested it (behaving like synchronous inference); slower ones never block."""
    final_obs_wait_periods: float = 3.0
    """After the last tick, wait up to this many periods for the robot's final state (>= 0)."""
    warmup: bool = True
    """One untimed policy call before the first episode (lazy initialisation, connection set-up)."""

    def __post_init__(self):
        if self.rate_hz is not None and not 1 <= self.rate_hz <= 500:
            raise ValueError(f"rate_hz must be in [1, 500] (robot arms run 10-50), got {self.rate_hz}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1 or None")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.n_action_steps is not None and self.n_action_steps < 1:
            raise ValueError("n_action_steps must be >= 1 or None")
        if not 0 <= self.async_tick_budget < 1:
            raise ValueError(f"async_tick_budget must be in [0, 1), got {self.async_tick_budget}")
        if self.ensemble_m < 0 or self.stream_stride < 1 or self.latency_margin_ticks < 0:
            raise ValueError("ensemble_m must be >= 0, stream_stride >= 1, latency_margin_ticks >= 0")
        if self.final_obs_wait_periods < 0:
            raise ValueError("final_obs_wait_periods must be >= 0")


# ---------------------------------------------------------------------------- chunk strategies
class ChunkStrategy:
    """Turns chunks ``(Ta, Da)`` tagged with their observation tick into one action per tick."""

    name = "base"

    def reset(self) -> None:
        raise NotImplementedError

    def wants_chunk(self, t: int, lead: int) -> bool:
        """Should a chunk be requested at tick ``t``, expecting it ``lead`` ticks later?"""
        raise NotImplementedError

    def requested(self, t: int) -> None:
        """A chunk was requested for tick ``t``'s observation."""

    def add_chunk(self, chunk: np.ndarray, t_obs: int) -> None:
        raise NotImplementedError

    def action(self, t: int) -> tuple[np.ndarray, int] | None:
        """``(action (Da,), t_obs of the newest chunk behind it)`` for tick ``t``, or None."""
        raise NotImplementedError

    def warm_start(self, t: int) -> np.ndarray | None:
        """(Ta, Da) initial guess for a chunk computed at tick ``t`` (RTI), or None."""
        return None


class OpenLoop(ChunkStrategy):
    """Execute ``n_exec`` actions per chunk; with ``overrun_ok`` (async) continue to the chunk's end while
    the next one is late."""

    name = "open_loop"

    def __init__(self, n_exec: int, horizon: int, overrun_ok: bool = False):
        if not 1 <= n_exec <= horizon:
            raise ValueError(f"n_action_steps must be in [1, Ta={horizon}], got {n_exec}")
        self.n_exec, self.horizon, self.overrun_ok = n_exec, horizon, overrun_ok
        self.reset()

    def reset(self) -> None:
        self.chunk: np.ndarray | None = None
        self.start = -(10**9)
        self.last_request = -(10**9)

    def wants_chunk(self, t: int, lead: int) -> bool:
        # (the loop only asks while no request is in flight, so a failed request is simply retried)
        return t > self.last_request and (self.chunk is None or t + lead >= self.start + self.n_exec)

    def requested(self, t: int) -> None:
        self.last_request = t

    def add_chunk(self, chunk: np.ndarray, t_obs: int) -> None:
        if t_obs >= self.start:
            self.chunk, self.start = chunk, t_obs

    def action(self, t: int) -> tuple[np.ndarray, int] | None:
        if self.chunk is None:
            return None
        j = t - self.start
        limit = self.horizon if self.overrun_ok else self.n_exec
        return (self.chunk[j], self.start) if 0 <= j < min(limit, len(self.chunk)) else None


class TemporalEnsemble(ChunkStrategy):
    """ACT's temporal ensembling: weighted mean of every chunk's prediction for the tick."""

    name = "temporal_ensemble"

    def __init__(self, horizon: int, m: float = 0.01):
        self.horizon, self.m = horizon, m
        self.reset()

    def reset(self) -> None:
        self.chunks: deque[tuple[int, np.ndarray]] = deque()
        self.last_request = -(10**9)

    def wants_chunk(self, t: int, lead: int) -> bool:
        return t > self.last_request

    def requested(self, t: int) -> None:
        self.last_request = t

    def add_chunk(self, chunk: np.ndarray, t_obs: int) -> None:
        self.chunks.append((t_obs, chunk))
        self.chunks = deque(sorted(self.chunks, key=lambda c: c[0]))

    def action(self, t: int) -> tuple[np.ndarray, int] | None:
        while self.chunks and self.chunks[0][0] + len(self.chunks[0][1]) <= t:
            self.chunks.popleft()
        preds = [(s, c[t - s]) for s, c in self.chunks if 0 <= t - s < len(c)]
        if not preds:
            return None
        w = np.exp(-self.m * np.arange(len(preds)))  # i = 0: the oldest prediction (ACT)
        acts = np.stack([p for _, p in preds])
        return (w[:, None] * acts).sum(0) / w.sum(), preds[-1][0]


class StreamingBuffer(ChunkStrategy):
    """Action buffer by tick; every ``stride`` ticks the newest chunk overwrites the future entries."""

    name = "streaming"

    def __init__(self, horizon: int, stride: int = 1):
        self.horizon, self.stride = horizon, stride
        self.reset()

    def reset(self) -> None:
        self.buffer: dict[int, tuple[np.ndarray, int]] = {}
        self.last_request = -(10**9)
        self.last_chunk: tuple[int, np.ndarray] | None = None

    def wants_chunk(self, t: int, lead: int) -> bool:
        if t <= self.last_request:
            return False
        return t - self.last_request >= self.stride or (t + lead) not in self.buffer

    def requested(self, t: int) -> None:
        self.last_request = t

    def add_chunk(self, chunk: np.ndarray, t_obs: int) -> None:
        if self.last_chunk is not None and t_obs < self.last_chunk[0]:
            return  # an older chunk than what is buffered: ignore
        for j, a in enumerate(chunk):
            self.buffer[t_obs + j] = (a, t_obs)
        self.last_chunk = (t_obs, chunk)

    def action(self, t: int) -> tuple[np.ndarray, int] | None:
        for old in [k for k in self.buffer if k < t]:
            del self.buffer[old]
        return self.buffer.pop(t, None)


class RTIWarmStart(StreamingBuffer):
    """Streaming buffer whose requests carry the previous chunk, shifted to the new tick, as warm start."""

    name = "rti"

    def warm_start(self, t: int) -> np.ndarray | None:
        if self.last_chunk is None:
            return None
        start, chunk = self.last_chunk
        shift = max(0, t - start)
        if shift >= len(chunk):
            return None
        rest = chunk[shift:]
        pad = np.repeat(rest[-1:], len(chunk) - len(rest), axis=0)
        return np.concatenate([rest, pad], axis=0)


# ---------------------------------------------------------------------------- inference engines
@dataclasses.dataclass
class ChunkResult:
    """A finished policy request."""

    chunk: np.ndarray | None
    """(Ta, Da) actions (None on error)."""
    t_obs: int
    """Tick of the observation it was computed from."""
    latency_s: float
    """Request round trip (seconds)."""
    error: BaseException | None = None
    """What the policy raised, if it failed."""


def _tensors(obs: Mapping[str, Any]) -> dict[str, Any]:
    """Numeric arrays -> tensors; text observations (lists of strings) pass unchanged."""
    import torch

    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in obs.items()}


def _batch_of_one(value: Any) -> Any:
    """One observation value -> a batch of one: (1, ...) array, or ``[text]`` for a string."""
    return [value] if isinstance(value, str) else np.asarray(value)[None]


def _stack_history(history: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """``To`` batches of one -> ``{key: (1, To, ...)}``; text keeps the latest ``[text]`` (no time axis)."""
    return {k: history[-1][k] if isinstance(history[-1][k], list) else
            np.concatenate([h[k] for h in history], axis=0)[None] for k in keys}


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


class InferenceEngine:
    """Runs policy requests for the loop. ``submit`` a request, ``collect`` finished ones.

    ``delegate=True``: each request is ``policy.select_action(obs_t)`` (the policy keeps its own state)
    and yields a one-step chunk; otherwise ``policy.predict_action_chunk(history)`` (+ ``warm_start``).
    ``asynchronous=True`` runs requests on a worker thread, one at a time.
    """

    def __init__(self, policy: Any, asynchronous: bool = False, delegate: bool = False):
        self.policy, self.asynchronous, self.delegate = policy, asynchronous, delegate
        self.supports_warm_start = bool(getattr(policy, "supports_warm_start", False))
        self._results: list[ChunkResult] = []
        self._lock = threading.Lock()
        self._busy = False
        self.latency_ema: float | None = None
        self.latencies: list[float] = []
        self._job: tuple | None = None
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._thread: threading.Thread | None = None
        if asynchronous:
            self._thread = threading.Thread(target=self._worker, name="async-inference", daemon=True)
            self._thread.start()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._busy

    def lead_ticks(self, period_s: float, margin: int, budget_s: float = 0.0) -> int:
        """Ticks to request ahead: 0 when synchronous or when the mean latency fits in ``budget_s`` (the
        tick then waits for its own request), else ceil(mean latency / period) + margin."""
        latency = self.latency_ema or 0.0
        if not self.asynchronous or latency <= budget_s:
            return 0
        return math.ceil(latency / period_s) + margin

    def _run(self, history: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray], t_obs: int,
             warm: np.ndarray | None) -> ChunkResult:
        import torch

        t0 = time.monotonic()
        try:
            if self.delegate:
                out = self.policy.select_action(_tensors(current))
                chunk = _to_numpy(out).reshape(1, -1)
            else:
                obs = _tensors(history)
                if warm is not None and self.supports_warm_start:
                    out = self.policy.predict_action_chunk(obs, warm_start=torch.from_numpy(warm[None]))
                else:
                    out = self.policy.predict_action_chunk(obs)
                chunk = _to_numpy(out)[0]
            result = ChunkResult(np.asarray(chunk, np.float64), t_obs, time.monotonic() - t0)
        except Exception as e:  # reported to the loop, which holds position
            result = ChunkResult(None, t_obs, time.monotonic() - t0, e)
        if result.error is None:
            self.latencies.append(result.latency_s)
            self.latency_ema = result.latency_s if self.latency_ema is None else \
                0.7 * self.latency_ema + 0.3 * result.latency_s
        return result

    def submit(self, history: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray], t_obs: int,
               warm: np.ndarray | None = None) -> bool:
        """Start a request; False when one is already running (async)."""
        with self._lock:
            if self._busy:
                return False
            self._busy = True
            if self.asynchronous:
                self._job = (history, current, t_obs, warm)
                self._wake.notify()
                return True
        result = self._run(history, current, t_obs, warm)
        with self._lock:
            self._results.append(result)
            self._busy = False
        return True

    def collect(self) -> list[ChunkResult]:
        with self._lock:
            out, self._results = self._results, []
        return out

    def _worker(self) -> None:
        while True:
            with self._lock:
                while self._job is None and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                job, self._job = self._job, None
            result = self._run(*job)
            with self._lock:
                self._results.append(result)
                self._busy = False

    def wait_idle(self, timeout_s: float = 60.0) -> bool:
        """Wait until no request is in flight; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.busy:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def drain(self, timeout_s: float = 5.0) -> None:
        """Wait for an in-flight request to finish (its result is discarded)."""
        self.wait_idle(timeout_s)
        self.collect()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(5)


# ---------------------------------------------------------------------------- the loop
@dataclasses.dataclass
class EpisodeResult:
    """What one deployed episode did (timings in milliseconds, one entry per executed tick)."""

    seed: int | None
    success: bool | None
    steps: int
    end_reason: str
    jitter_ms: np.ndarray
    """How late each tick started relative to its schedule."""
    e2e_ms: np.ndarray
    """Per action: tick start (observe) -> command sent (observe + inference if any + filter + command)."""
    obs_to_command_ms: np.ndarray
    """Per action: the robot's timestamp of the observation read this tick -> command sent."""
    action_age_ms: np.ndarray
    """Per action: the observation the action was computed from -> command sent (NaN when held)."""
    inference_ms: np.ndarray
    """Per policy request: round trip, as seen by the loop."""
    overruns: int
    """Ticks skipped because the loop was more than a period late."""
    safety_counts: dict[str, int]
    inference_errors: int
    driver_info: dict[str, Any]
    watchdog_tripped_at: float | None = None
    """``time.monotonic()`` when the loop's watchdog fired (None: it did not)."""
    last_fresh_at: float | None = None
    """``time.monotonic()`` of the last fresh command."""
    log: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    """The per-tick columns, as written to the episode store."""


class EpisodeLogger:
    """Appends deployed episodes to a zarr EpisodeStore (opened lazily; one whole episode per append)."""

    def __init__(self, path: str | Path, attrs: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.attrs = dict(attrs or {})
        self._store = None

    def add(self, data: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> int:
        from embodied_distill.data.episode_store import EpisodeStore

        if self._store is None:
            self._store = EpisodeStore(self.path, mode="a")
            if self._store.n_episodes == 0 and self.attrs:
                self._store.set_attrs(**{k: v for k, v in self.attrs.items() if v is not None})
        return self._store.add_episode(data, meta)


class ControlLoop:
    """Runs episodes of ``policy`` on ``driver`` at a fixed rate (see the module docstring).

    Args:
        driver: any RobotDriver.
        policy: anything with the Policy interface (``config.obs_keys / obs_horizon / action_horizon /
            n_action_steps``, ``predict_action_chunk``, ``reset``; ``select_action`` for delegation).
        config: loop settings.
        safety: safety settings (the filter uses ``driver.limits()``).
        estop: shared e-stop (one is made if None); its callbacks stop the driver.
        logger: where episodes are logged (None: not logged).
    """

    def __init__(self, driver: RobotDriver, policy: Any, config: ControlLoopConfig | None = None,
                 safety: SafetyConfig | None = None, estop: EStop | None = None,
                 logger: EpisodeLogger | None = None):
        self.driver, self.policy = driver, policy
        self.config = cfg = config or ControlLoopConfig()
        self.limits = driver.limits()
        self.rate_hz = float(cfg.rate_hz or self.limits.control_hz)
        if not 1 <= self.rate_hz <= 500:
            raise ValueError(f"loop rate {self.rate_hz} Hz is outside [1, 500]")
        self.period_s = 1.0 / self.rate_hz
        pcfg = policy.config
        if int(pcfg.action_dim) not in (0, self.limits.action_dim):
            raise ValueError(f"the policy outputs {pcfg.action_dim}-D actions but the robot takes "
                             f"{self.limits.action_dim}-D commands")
        self.obs_keys, self.obs_horizon = tuple(pcfg.obs_keys), int(pcfg.obs_horizon)
        self.horizon = int(pcfg.action_horizon)
        self.safety_config = safety or SafetyConfig()
        self.filter = SafetyFilter(self.limits, self.safety_config)
        self.estop = estop or EStop()
        self._own_estop = estop is None
        self.estop.add_callback(self.driver.stop)
        self.logger = logger
        stateful = bool(getattr(policy, "stateful_select_action", False))
        delegate = cfg.strategy in ("streaming", "rti") and stateful
        if delegate:
            self.strategy: ChunkStrategy = StreamingBuffer(1, 1)
        elif cfg.strategy == "open_loop":
            self.strategy = OpenLoop(int(cfg.n_action_steps or pcfg.n_action_steps), self.horizon,
                                     overrun_ok=cfg.async_inference)
        elif cfg.strategy == "temporal_ensemble":
            self.strategy = TemporalEnsemble(self.horizon, cfg.ensemble_m)
        elif cfg.strategy == "streaming":
            self.strategy = StreamingBuffer(self.horizon, cfg.stream_stride)
        else:
            self.strategy = RTIWarmStart(self.horizon, cfg.stream_stride)
        self.delegate = delegate
        self.engine = InferenceEngine(policy, asynchronous=cfg.async_inference and not delegate,
                                      delegate=delegate)
        self.watchdog = Watchdog(self.safety_config.watchdog_periods * self.period_s, self._on_watchdog,
                                 "watchdog")
        self.episodes = 0

    def _on_watchdog(self, reason: str) -> None:
        self.driver.stop(reason)

    def close(self) -> None:
        self.watchdog.close()
        self.engine.close()
        if self._own_estop:
            self.estop.close()

    def __enter__(self) -> ControlLoop:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ one episode
    def run_episode(self, seed: int | None = None, meta: Mapping[str, Any] | None = None) -> EpisodeResult:
        """Home the robot (seeded for simulators), run until max_steps / done / stop, log the episode."""
        if self.estop.triggered:
            raise RuntimeError(f"e-stop is latched ({self.estop.reason}); start a new deployment")
        cfg, P = self.config, self.period_s
        self.watchdog.reset()
        obs = self.driver.home(seed)
        self.filter.reset(obs.position)
        self.strategy.reset()
        self.policy.reset()
        self.engine.collect()
        history: deque[dict[str, np.ndarray]] = deque(maxlen=self.obs_horizon)
        stamps: dict[int, float] = {}
        rows: dict[str, list[Any]] = {k: [] for k in (
            "action", "policy_action", "safety_flags", "tick", "source_tick", "obs_seq", "obs_stamp",
            "command_time", "jitter_ms", "e2e_ms", "action_age_ms", "fresh")}
        obs_rows: dict[str, list[np.ndarray]] = {  # numeric observation keys are logged
            k: [] for k, v in obs.data.items() if np.asarray(v).dtype.kind in "biuf"}
        inference_ms: list[float] = []
        n_errors, overruns, end_reason = 0, 0, "max_steps"
        last_fresh: float | None = None
        last_error: str | None = None
        if cfg.warmup and self.episodes == 0:
            self._warmup(obs)
        if self.engine.asynchronous:
            # the robot rests until the first command, so compute the first chunk before the clock starts
            now_obs = {key: _batch_of_one(obs.data[key]) for key in self.obs_keys}
            first = _stack_history([now_obs] * self.obs_horizon, self.obs_keys)
            self.strategy.requested(0)
            self.engine.submit(first, now_obs, 0)
            self.engine.wait_idle()
        t0 = time.monotonic()
        k = 0
        while cfg.max_steps is None or k < cfg.max_steps:
            target = t0 + k * P
            now = time.monotonic()
            if now < target:
                time.sleep(target - now)
            start = time.monotonic()
            late = start - target
            if late > P:  # more than a whole period late: skip the missed ticks
                skipped = int(late // P)
                overruns += skipped
                k += skipped
                target += skipped * P
                late = start - target
                if cfg.max_steps is not None and k >= cfg.max_steps:
                    break
            if self.estop.triggered:
                end_reason = f"e-stop: {self.estop.reason}"
                break
            if self.watchdog.tripped:
                end_reason = self.watchdog.trip_reason or "watchdog"
                break
            try:
                obs = self.driver.observe()
            except Exception as e:  # a lost robot link: the robot side's own watchdog stops the arm
                end_reason = f"driver error: {type(e).__name__}: {e}"
                break
            if obs.stopped:
                end_reason = f"robot stopped: {obs.info.get('stop_reason')}"
                break
            if obs.done:
                end_reason = "done"
                break
            problem = self.filter.check_state(obs)
            if problem is not None:
                self.driver.stop(problem)
                end_reason = f"protective stop: {problem}"
                break
            stamps[k] = obs.stamp
            current = {key: _batch_of_one(obs.data[key]) for key in self.obs_keys}
            history.append(current)
            while len(history) < self.obs_horizon:
                history.appendleft(current)

            # policy results, and a new request when the strategy wants one
            budget = cfg.async_tick_budget * P
            lead = self.engine.lead_ticks(P, cfg.latency_margin_ticks, budget)
            for attempt in range(2):
                for res in self.engine.collect():
                    inference_ms.append(res.latency_s * 1e3)
                    if res.error is not None:
                        n_errors += 1
                        last_error = f"{type(res.error).__name__}: {res.error}"
                        self.strategy.reset()  # a failed request discards the plan: hold, then watchdog
                        self.strategy.requested(k)  # (retry from the next tick on)
                        if isinstance(res.error, EStopError):
                            self.estop.trigger(f"policy server: {res.error.message}")
                    else:
                        self.strategy.add_chunk(res.chunk, res.t_obs)
                if attempt == 0 and not self.engine.busy and self.strategy.wants_chunk(k, lead):
                    hist = _stack_history(history, self.obs_keys)
                    self.strategy.requested(k)
                    self.engine.submit(hist, current, k, self.strategy.warm_start(k))
                    if self.engine.asynchronous and lead == 0:  # a fast policy: wait within the budget
                        self.engine.wait_idle(max(0.0, start + budget - time.monotonic()))
                else:
                    break

            planned = self.strategy.action(k)
            if planned is None:
                safe = self.filter.hold(SafetyFlag.NO_ACTION)
                raw = np.full(self.limits.action_dim, np.nan)
                src = None
            else:
                raw, src = planned
                safe = self.filter.filter(raw, obs.position)
            try:
                self.driver.command(safe.command, obs.seq)
            except Exception as e:
                end_reason = f"driver error: {type(e).__name__}: {e}"
                break
            sent = time.monotonic()
            fresh = planned is not None and not safe.held
            if fresh:
                self.watchdog.feed()
                last_fresh = sent
            for key in obs_rows:
                obs_rows[key].append(np.asarray(obs.data[key]))
            rows["action"].append(safe.command.astype(np.float32))
            rows["policy_action"].append(np.resize(np.asarray(raw, np.float32), self.limits.action_dim))
            rows["safety_flags"].append(int(safe.flags))
            rows["tick"].append(k)
            rows["source_tick"].append(-1 if src is None else src)
            rows["obs_seq"].append(obs.seq)
            rows["obs_stamp"].append(obs.stamp)
            rows["command_time"].append(sent)
            rows["jitter_ms"].append(late * 1e3)
            rows["e2e_ms"].append((sent - start) * 1e3)
            rows["action_age_ms"].append((sent - stamps[src]) * 1e3 if src in stamps else np.nan)
            rows["fresh"].append(fresh)
            k += 1

        self.watchdog.disarm()
        self.engine.drain()
        final = self._final_observation(obs, len(rows["tick"]))
        completed = end_reason in ("max_steps", "done") and not final.stopped
        success = None if final.success is None else bool(final.success) and completed
        data: dict[str, np.ndarray] = {}
        if rows["tick"]:
            data = {key: np.stack(v) for key, v in obs_rows.items() if v}
            data.update({
                "action": np.stack(rows["action"]), "policy_action": np.stack(rows["policy_action"]),
                "safety_flags": np.asarray(rows["safety_flags"], np.int32),
                "tick": np.asarray(rows["tick"], np.int64), "obs_seq": np.asarray(rows["obs_seq"], np.int64),
                "source_tick": np.asarray(rows["source_tick"], np.int64),
                "obs_stamp": np.asarray(rows["obs_stamp"], np.float64),
                "command_time": np.asarray(rows["command_time"], np.float64),
                "jitter_ms": np.asarray(rows["jitter_ms"], np.float32),
                "e2e_ms": np.asarray(rows["e2e_ms"], np.float32),
                "action_age_ms": np.asarray(rows["action_age_ms"], np.float32),
                "fresh": np.asarray(rows["fresh"], bool)})
        result = EpisodeResult(
            seed=seed, success=success, steps=len(rows["tick"]), end_reason=end_reason,
            jitter_ms=np.asarray(rows["jitter_ms"]), e2e_ms=np.asarray(rows["e2e_ms"]),
            obs_to_command_ms=(np.asarray(rows["command_time"]) - np.asarray(rows["obs_stamp"])) * 1e3,
            action_age_ms=np.asarray(rows["action_age_ms"], np.float64),
            inference_ms=np.asarray(inference_ms),
            overruns=overruns, safety_counts=dict(self.filter.counts), inference_errors=n_errors,
            driver_info={**final.info, "last_inference_error": last_error},
            watchdog_tripped_at=self.watchdog.tripped_at, last_fresh_at=last_fresh, log=data)
        if self.logger is not None and data:
            self.logger.add(data, {"seed": -1 if seed is None else int(seed),
                                   "success": -1 if success is None else int(success),
                                   "end_reason": end_reason[:200], **dict(meta or {})})
        self.episodes += 1
        return result

    def _warmup(self, obs: RobotObservation) -> None:
        """One untimed request on the home observation (results discarded, policy state reset)."""
        current = {key: _batch_of_one(obs.data[key]) for key in self.obs_keys}
        hist = _stack_history([current] * self.obs_horizon, self.obs_keys)
        self.engine.submit(hist, current, 0)
        self.engine.wait_idle()
        self.engine.collect()
        self.engine.latencies.clear()
        self.engine.latency_ema = None
        self.policy.reset()

    def _final_observation(self, last: RobotObservation, commands: int) -> RobotObservation:
        """The robot's state after the last command took effect (a simulator's final success flag)."""
        deadline = time.monotonic() + self.config.final_obs_wait_periods * max(self.period_s,
                                                                              self.limits.period_s)
        obs = last
        while True:
            try:
                obs = self.driver.observe()
            except Exception:
                return obs
            if obs.done or obs.stopped or obs.seq >= commands or time.monotonic() > deadline:
                return obs
            time.sleep(min(0.002, self.period_s / 10))
