"""Control loop: chunk strategies, latency alignment of asynchronous inference, NaN hold, watchdog,
e-stop, episode logging; on the real-time point-mass robot (threads, real clocks)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from bridge_helpers import GoalSeeker, ScriptedConfig
from embodied_distill.real_robot.control_loop import (
    ControlLoop,
    ControlLoopConfig,
    EpisodeLogger,
    OpenLoop,
    RTIWarmStart,
    StreamingBuffer,
    TemporalEnsemble,
)
from embodied_distill.real_robot.driver import PointMassDriver
from embodied_distill.real_robot.estop import EStopEndpoint, send_estop
from embodied_distill.real_robot.rpc import ServerConfig
from embodied_distill.real_robot.safety import EStop, SafetyConfig, SafetyFlag

from embodied_distill.data.episode_store import EpisodeStore


def _chunk(value: float, n: int = 8) -> np.ndarray:
    c = np.zeros((n, 7))
    c[:, 3] = value + np.arange(n) / 100  # dim 3 encodes the index j
    return c


# ---------------------------------------------------------------------------- strategies (pure)
def test_open_loop_executes_n_steps_and_aligns_late_chunks_by_tick():
    s = OpenLoop(n_exec=4, horizon=8)
    assert s.wants_chunk(0, 0)
    s.requested(0)
    s.add_chunk(_chunk(0), t_obs=0)
    assert [round(s.action(t)[0][3] * 100) for t in range(4)] == [0, 1, 2, 3]
    assert s.action(4) is None and s.wants_chunk(4, 0) and not s.wants_chunk(2, 0)
    assert s.wants_chunk(2, lead=2)  # asynchronous: ask early by the measured latency
    s.requested(4)
    s.add_chunk(_chunk(1), t_obs=4)  # computed from tick 4's observation, arrives at tick 7:
    action, source = s.action(7)  # index 3: the first 3 are already in the past
    np.testing.assert_array_equal(action, _chunk(1)[3])
    assert source == 4
    s2 = OpenLoop(4, 8, overrun_ok=True)
    s2.add_chunk(_chunk(0), 0)
    assert s2.action(6) is not None and s2.action(8) is None  # async: run on to the chunk's end


def test_temporal_ensemble_weights_older_chunks_more_like_act():
    s = TemporalEnsemble(horizon=8, m=0.5)
    s.add_chunk(np.full((8, 7), 1.0), 0)
    s.add_chunk(np.full((8, 7), 3.0), 1)
    w = np.exp(-0.5 * np.arange(2))
    np.testing.assert_allclose(s.action(1)[0], (1.0 * w[0] + 3.0 * w[1]) / w.sum())
    assert s.action(1)[1] == 1 and s.action(8)[0][0] == 3.0 and s.action(9) is None


def test_streaming_buffer_overwrites_the_future_and_rti_warm_starts_from_the_shifted_chunk():
    s = StreamingBuffer(horizon=8, stride=2)
    s.add_chunk(_chunk(0), 0)
    s.add_chunk(_chunk(1), 2)
    assert s.action(1)[0][3] == pytest.approx(0.01) and s.action(3)[0][3] == pytest.approx(1.01)
    assert s.wants_chunk(4, 0) and not (s.requested(4) or s.wants_chunk(5, 0))
    r = RTIWarmStart(horizon=8, stride=1)
    assert r.warm_start(0) is None
    r.add_chunk(_chunk(0), 0)
    warm = r.warm_start(3)
    np.testing.assert_allclose(warm[:5, 3], _chunk(0)[3:, 3])
    np.testing.assert_allclose(warm[5:, 3], _chunk(0)[-1, 3])  # padded with the last action


class WarmStartPolicy(GoalSeeker):
    """Records the warm starts it is given (an RTI sampler would start its denoising from them)."""

    supports_warm_start = True

    def __init__(self):
        super().__init__()
        self.warm: list = []

    def predict_action_chunk(self, obs, warm_start=None):
        self.warm.append(None if warm_start is None else warm_start.clone())
        return super().predict_action_chunk(obs)


class StatefulPolicy(GoalSeeker):
    """Declares its own per-step sampler (like a streaming diffusion policy): the loop must delegate."""

    stateful_select_action = True

    def __init__(self):
        super().__init__()
        self.select_calls = self.resets = 0

    def reset(self):
        self.resets += 1

    def select_action(self, obs):
        self.select_calls += 1
        return super().select_action(obs)


def test_rti_passes_warm_starts_and_streaming_delegates_to_a_stateful_sampler():
    drv = PointMassDriver(realtime=False, max_episode_steps=12)
    try:
        pol = WarmStartPolicy()
        with ControlLoop(drv, pol, ControlLoopConfig(rate_hz=200, strategy="rti", warmup=False)) as loop:
            loop.run_episode(seed=0)
        assert pol.warm[0] is None and all(w is not None and w.shape == (1, 8, 7) for w in pol.warm[1:])
        pol2 = StatefulPolicy()
        cfg = ControlLoopConfig(rate_hz=200, strategy="streaming", warmup=False)
        with ControlLoop(drv, pol2, cfg) as loop:
            r = loop.run_episode(seed=0)
        assert pol2.select_calls == r.steps == 12 and pol2.calls == 12 and pol2.resets == 1
    finally:
        drv.close()


# ---------------------------------------------------------------------------- the loop in real time
@pytest.mark.parametrize("strategy,asynchronous", [("open_loop", False), ("temporal_ensemble", True)])
def test_loop_runs_at_rate_succeeds_and_logs_episodes(tmp_path, strategy, asynchronous):
    drv = PointMassDriver(control_hz=25, max_episode_steps=40)
    store = tmp_path / "episodes.zarr"
    try:
        cfg = ControlLoopConfig(strategy=strategy, async_inference=asynchronous)
        # (a generous watchdog: this test is about rate and logging on a shared, loaded machine)
        with ControlLoop(drv, GoalSeeker(), cfg, SafetyConfig(watchdog_periods=10),
                         logger=EpisodeLogger(store, {"robot": "pointmass"})) as loop:
            results = [loop.run_episode(seed=s) for s in (1, 2)]
    finally:
        drv.close()
    for r in results:
        assert r.success and 36 <= r.steps <= 40 and r.end_reason == "done"
        assert len(r.jitter_ms) == r.steps and np.percentile(r.jitter_ms, 50) < 5.0
        period = np.diff(r.log["command_time"])
        assert abs(np.median(period) - 0.04) < 0.004  # 25 Hz
    st = EpisodeStore(store, mode="r")
    assert st.n_episodes == 2 and st.attrs["robot"] == "pointmass"
    assert st.n_steps == sum(r.steps for r in results)
    assert {"state", "action", "policy_action", "safety_flags", "tick", "source_tick", "jitter_ms", "e2e_ms",
            "action_age_ms", "fresh"} <= set(st.keys)
    assert list(st.episode_meta("seed")) == [1, 2] and list(st.episode_meta("success")) == [1, 1]
    ep = st.get_episode(0)
    assert ep["state"].shape == ep["action"].shape == (results[0].steps, 7) and ep["fresh"].all()


class SlowChunks:
    """Chunks whose dim 3 encodes the index j, computed in ``latency_s`` (a big teacher over a network)."""

    name = "slow"

    def __init__(self, latency_s: float):
        self.config = ScriptedConfig(action_horizon=8, n_action_steps=4)
        self.latency_s = latency_s

    def reset(self):
        pass

    def predict_action_chunk(self, obs):
        time.sleep(self.latency_s)
        chunk = torch.zeros(1, 8, 7)
        chunk[0, :, 3] = torch.arange(8) / 100
        chunk[0, :, 6] = 1.0
        return chunk


def test_async_inference_never_starves_and_aligns_chunks_for_the_measured_latency():
    drv = PointMassDriver(control_hz=20, max_episode_steps=30)
    try:
        cfg = ControlLoopConfig(strategy="open_loop", async_inference=True, latency_margin_ticks=2)
        with ControlLoop(drv, SlowChunks(0.11), cfg, SafetyConfig(watchdog_periods=10)) as loop:
            r = loop.run_episode(seed=0)
    finally:
        drv.close()
    log = r.log
    j = np.round(log["policy_action"][:, 3] * 100).astype(int)
    assert (j == log["tick"] - log["source_tick"]).all()  # action j of a chunk runs at tick t_obs + j
    assert "NO_ACTION" not in r.safety_counts and log["fresh"].all()  # requested early enough
    starts = np.flatnonzero(np.diff(log["source_tick"]) != 0) + 1
    assert len(starts) >= 4 and (j[starts] >= 2).all()  # 110 ms late -> the first 2+ actions are skipped
    assert np.median(r.inference_ms) >= 110 and np.percentile(r.jitter_ms, 50) < 5.0


class NaNBurst(GoalSeeker):
    """Returns NaN chunks on calls listed in ``bad``."""

    def __init__(self, bad):
        super().__init__(n_action_steps=1)
        self.bad = set(bad)

    def predict_action_chunk(self, obs):
        chunk = super().predict_action_chunk(obs)
        return chunk * float("nan") if self.calls in self.bad else chunk


def test_a_nan_action_holds_position_and_a_nan_stream_stops_the_robot():
    drv = PointMassDriver(realtime=False, max_episode_steps=20)
    try:
        cfg = ControlLoopConfig(rate_hz=100, warmup=False)
        with ControlLoop(drv, NaNBurst(bad={5}), cfg, SafetyConfig(watchdog_periods=2.5)) as loop:
            r = loop.run_episode(seed=3)
        flags, pos = r.log["safety_flags"], r.log["state"][:, :3]
        held = np.flatnonzero(flags & SafetyFlag.NONFINITE)
        assert list(held) == [4] and r.steps == 20 and r.end_reason == "done"
        np.testing.assert_array_equal(r.log["action"][4], [0, 0, 0, 0, 0, 0, 1.0])
        np.testing.assert_allclose(pos[5], pos[4])  # the robot did not move during the held period
        assert not np.allclose(pos[4], pos[3])      # (it was moving before)
        stream = NaNBurst(bad=set(range(5, 100)))
        with ControlLoop(drv, stream, cfg, SafetyConfig(watchdog_periods=2.5)) as loop:
            r = loop.run_episode(seed=3)
        assert r.end_reason.startswith(("watchdog", "robot stopped")) and drv.observe().stopped
        assert r.steps <= 4 + 4
    finally:
        drv.close()


class Hangs(GoalSeeker):
    """Answers ``good`` requests, then blocks (a policy process that stopped answering)."""

    def __init__(self, good: int, hang_s: float):
        super().__init__(n_action_steps=1)
        self.good, self.hang_s = good, hang_s

    def predict_action_chunk(self, obs):
        if self.calls >= self.good:
            time.sleep(self.hang_s)
        return super().predict_action_chunk(obs)


def test_watchdog_stops_the_robot_within_two_periods_of_the_last_fresh_action():
    drv = PointMassDriver(control_hz=20)
    try:
        with ControlLoop(drv, Hangs(good=10, hang_s=0.6), ControlLoopConfig(warmup=False)) as loop:
            r = loop.run_episode(seed=0)
        obs = drv.observe()
        assert obs.stopped and "no fresh action" in obs.info["stop_reason"]
        stop_delay = obs.info["stopped_at"] - r.last_fresh_at
        assert stop_delay <= 2 * 0.05 + 0.02, stop_delay
        assert r.end_reason.startswith("watchdog")
        assert drv.counters["ignored_commands"] == 0 or drv.received[-1][0] < obs.info["stopped_at"] + 0.7
    finally:
        drv.close()


def test_estop_endpoint_stops_a_running_loop(keys_dir):
    drv = PointMassDriver(control_hz=20, max_episode_steps=200)
    es = EStop()
    try:
        with EStopEndpoint(es, ServerConfig(port=0, keys_dir=keys_dir)) as ep, \
                ControlLoop(drv, GoalSeeker(), ControlLoopConfig(), estop=es) as loop:
            timer = threading.Timer(0.4, send_estop, args=(ep.address, "test button"),
                                    kwargs={"keys_dir": keys_dir})
            timer.start()
            r = loop.run_episode(seed=0)
            timer.join()
        assert r.end_reason.startswith("e-stop") and r.steps < 20
        obs = drv.observe()
        assert obs.stopped and "test button" in obs.info["stop_reason"]
        with pytest.raises(RuntimeError, match="latched"):
            ControlLoop(drv, GoalSeeker(), estop=es).run_episode(seed=1)
    finally:
        es.close()
        drv.close()


class InstructedPointMass(PointMassDriver):
    """A point mass whose observation also carries a language instruction (as a LIBERO-style sim would)."""

    def _read(self):
        data, position, joints, success = super()._read()
        return {**data, "instruction": "reach the goal"}, position, joints, success


class InstructedSeeker(GoalSeeker):
    def __init__(self):
        super().__init__()
        self.config.obs_keys = ("state", "instruction")
        self.instructions: list = []

    def predict_action_chunk(self, obs):
        self.instructions.append(obs["instruction"])
        return super().predict_action_chunk(obs)


def test_text_observations_go_to_the_policy_without_a_time_axis_and_are_not_logged(tmp_path):
    drv = InstructedPointMass(realtime=False, max_episode_steps=10)
    pol = InstructedSeeker()
    try:
        with ControlLoop(drv, pol, ControlLoopConfig(rate_hz=100, warmup=False),
                         logger=EpisodeLogger(tmp_path / "ep.zarr")) as loop:
            r = loop.run_episode(seed=0)
    finally:
        drv.close()
    assert r.steps == 10 and pol.instructions and all(i == ["reach the goal"] for i in pol.instructions)
    assert "instruction" not in EpisodeStore(tmp_path / "ep.zarr", mode="r").keys
