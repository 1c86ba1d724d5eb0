"""Safety layer: fuzzed policy outputs never give an out-of-limit command; NaN holds; debounce;
watchdog timing; e-stop by call and by signal."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from embodied_distill.real_robot.driver import PointMassDriver, RobotLimits, RobotObservation
from embodied_distill.real_robot.safety import EStop, SafetyConfig, SafetyFilter, SafetyFlag, Watchdog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

INF = np.inf
EPS = 1e-9


def ee_limits(accel: float = 4.0) -> RobotLimits:
    """pd_ee_delta_pose-like: xyz deltas (5 cm/unit) in a box, rotation deltas, a gripper."""
    return RobotLimits(control_hz=20.0, dim_kinds=("delta",) * 6 + ("gripper",), command_low=-np.ones(7),
                       command_high=np.ones(7), delta_scale=[0.05] * 3 + [0.1] * 3 + [1.0],
                       position_low=[-0.3, -0.3, 0.0, -INF, -INF, -INF, -INF],
                       position_high=[0.3, 0.3, 0.4, INF, INF, INF, INF],
                       max_velocity=[0.6] * 3 + [1.0] * 3 + [INF],
                       max_acceleration=[accel] * 3 + [20.0] * 3 + [INF],
                       workspace_dims=(0, 1, 2), joint_low=[-1.0, -1.0], joint_high=[1.0, 1.0])


def joint_limits() -> RobotLimits:
    """pd_joint_pos-like: absolute joint targets within joint limits, a gripper."""
    return RobotLimits(control_hz=20.0, dim_kinds=("absolute",) * 3 + ("gripper",),
                       command_low=[-2.0, -1.0, 0.0, -1.0], command_high=[2.0, 1.0, 3.0, 1.0],
                       delta_scale=np.ones(4), position_low=[-2.0, -1.0, 0.0, -INF],
                       position_high=[2.0, 1.0, 3.0, INF], max_velocity=[2.0, 2.0, 2.0, INF],
                       max_acceleration=[15.0, 15.0, 15.0, INF])


wild = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64),
                 st.floats(-3, 3), st.sampled_from([0.0, 1.0, -1.0, 1e308, -1e308]))


def check_ee_command(lim, f, cmd, pos, prev_step, res):
    """Every limit that the module docstring promises, for one period."""
    dt = lim.period_s
    assert cmd.shape == (7,) and np.isfinite(cmd).all()
    assert (cmd >= lim.command_low - EPS).all() and (cmd <= lim.command_high + EPS).all()
    step = cmd[:6] * lim.delta_scale[:6]
    assert (np.abs(step) <= f.vmax[:6] * dt + EPS).all(), "velocity limit broken"
    inside = (pos[:3] >= lim.position_low[:3]) & (pos[:3] <= lim.position_high[:3])
    nxt = pos[:3] + step[:3]
    for i in range(3):
        if inside[i]:
            assert lim.position_low[i] - EPS <= nxt[i] <= lim.position_high[i] + EPS, "left the workspace"
        elif pos[i] < lim.position_low[i]:
            assert step[i] >= -EPS, "moved further out of the workspace"
        else:
            assert step[i] <= EPS, "moved further out of the workspace"
    if not res.flags & (SafetyFlag.ACCEL_OVERRIDDEN | SafetyFlag.HELD):
        assert (np.abs(step - prev_step) <= f.amax[:6] * dt * dt + 1e-7).all(), "acceleration limit broken"
    assert cmd[6] in (lim.gripper_open, lim.gripper_closed)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=st.lists(st.lists(wild, min_size=7, max_size=7), min_size=1, max_size=12),
       start=st.lists(st.floats(-0.5, 0.6), min_size=3, max_size=3),
       accel=st.sampled_from([0.5, 4.0, INF]), vscale=st.sampled_from([0.25, 1.0]))
def test_fuzzed_actions_never_give_an_out_of_limit_ee_command(actions, start, accel, vscale):
    lim = ee_limits(accel)
    f = SafetyFilter(lim, SafetyConfig(velocity_scale=vscale, gripper_binary=True))
    pos = np.array([*start, 0, 0, 0, 1.0])
    f.reset(pos)
    prev_step = np.zeros(6)
    for a in actions:
        res = f.filter(np.array(a), pos)
        check_ee_command(lim, f, res.command, pos, prev_step, res)
        if not np.isfinite(a).all():
            assert res.held and (res.command[:6] == 0).all()
        prev_step = res.command[:6] * lim.delta_scale[:6]
        pos = pos.copy()
        pos[:3] += prev_step[:3]  # the robot tracks the command perfectly


@settings(max_examples=200, deadline=None)
@given(actions=st.lists(st.lists(wild, min_size=4, max_size=4), min_size=1, max_size=12),
       start=st.lists(st.floats(-3, 3), min_size=3, max_size=3))
def test_fuzzed_actions_never_give_an_out_of_limit_joint_target(actions, start):
    lim = joint_limits()
    f = SafetyFilter(lim, SafetyConfig(gripper_binary=False, gripper_debounce_steps=1))
    f.reset(np.array([*start, 1.0]))
    prev = np.clip(np.array(start), lim.command_low[:3], lim.command_high[:3])
    prev_step = np.zeros(3)
    dt = lim.period_s
    for a in actions:
        res = f.filter(np.array(a), np.array([*start, 1.0]))
        cmd = res.command
        assert np.isfinite(cmd).all()
        assert (cmd >= lim.command_low - EPS).all() and (cmd <= lim.command_high + EPS).all()
        assert (cmd[:3] >= lim.position_low[:3] - EPS).all()
        assert (cmd[:3] <= lim.position_high[:3] + EPS).all()
        step = cmd[:3] - prev
        assert (np.abs(step) <= lim.max_velocity[:3] * dt + EPS).all()
        if res.held:
            assert (cmd[:3] == prev).all()  # NaN: the last safe target is held
        elif not res.flags & SafetyFlag.ACCEL_OVERRIDDEN:
            assert (np.abs(step - prev_step) <= lim.max_acceleration[:3] * dt * dt + 1e-7).all()
        prev_step = np.zeros(3) if res.held else step
        prev = cmd[:3]


def test_nan_action_holds_position_on_the_robot():
    drv = PointMassDriver(realtime=False)
    try:
        obs = drv.home(seed=1)
        f = SafetyFilter(drv.limits())
        f.reset(obs.position)
        drv.command(f.filter(np.array([0.2, 0, 0, 0, 0, 0, 1.0]), obs.position).command, obs.seq)
        before = drv.observe()
        for bad in ([np.nan] * 7, [np.inf, 0, 0, 0, 0, 0, 1], [0.5, 0, 0, np.nan, 0, 0, -1]):
            res = f.filter(np.array(bad), before.position)
            assert res.held and res.flags & SafetyFlag.NONFINITE
            np.testing.assert_array_equal(res.command, [0, 0, 0, 0, 0, 0, 1.0])  # no motion, gripper kept
            drv.command(res.command, before.seq)
            after = drv.observe()
            np.testing.assert_allclose(after.position[:3], before.position[:3], atol=1e-12)
            before = after
        assert drv.counters["rejected_commands"] == 0
        drv.command(np.array([np.nan] * 7))  # the driver itself refuses a non-finite command too
        assert drv.counters["rejected_commands"] == 1
    finally:
        drv.close()


def test_bad_shape_and_bad_state_hold():
    f = SafetyFilter(ee_limits())
    f.reset(np.zeros(7))
    assert f.filter(np.zeros(6), np.zeros(7)).flags & SafetyFlag.BAD_SHAPE
    assert f.filter(np.zeros(7), np.array([np.nan] + [0] * 6)).flags & SafetyFlag.BAD_STATE
    open_ = np.array([0, 0, 0, 0, 0, 0, 1.0])
    assert f.filter(open_, np.array([0, 0, 0, np.nan, 0, 0, 0])).flags == SafetyFlag.NONE  # rotation
    f.filter(np.array([1.0] * 7), np.zeros(7))
    assert f.counts["VELOCITY"] >= 1


def test_workspace_override_only_tightens():
    f = SafetyFilter(ee_limits(), SafetyConfig(workspace_low=(-1, -1, 0.1), workspace_high=(0.1, 1, 1)))
    np.testing.assert_allclose(f.pos_low[:3], [-0.3, -0.3, 0.1])
    np.testing.assert_allclose(f.pos_high[:3], [0.1, 0.3, 0.4])
    with pytest.raises(ValueError, match="does not overlap"):
        SafetyFilter(ee_limits(), SafetyConfig(workspace_low=(0.5, -1, 0), workspace_high=(0.6, 1, 1)))
    with pytest.raises(ValueError):
        SafetyConfig(velocity_scale=1.5)


def _gripper(config: SafetyConfig):
    f = SafetyFilter(ee_limits(), config)
    f.reset(np.array([0, 0, 0.2, 0, 0, 0, 1.0]))  # open

    def grip(v):
        return f.filter(np.array([0, 0, 0, 0, 0, 0, v]), np.array([0, 0, 0.2, 0, 0, 0, 1.0])).command[6]

    return grip


def test_gripper_trailing_debounce_and_hysteresis():
    grip = _gripper(SafetyConfig(gripper_debounce_steps=3, gripper_min_dwell_steps=0, gripper_hysteresis=0.2,
                                 gripper_binary=True))
    assert [grip(v) for v in (-1, 1, -1, 1, -1, -1)] == [1.0] * 6  # chatter never closes it
    assert grip(-1) == -1.0                                        # 3rd consecutive request commits
    assert [grip(v) for v in (0.1, 0.3, 0.1)] == [-1.0] * 3         # inside the dead band: no change
    assert [grip(v) for v in (0.9, 0.9, 0.9)] == [-1.0, -1.0, 1.0]


def test_gripper_leading_edge_debounce_sends_a_clean_grasp_at_once_and_suppresses_chatter():
    grip = _gripper(SafetyConfig())  # defaults: min dwell 3 periods, values passed through
    assert grip(-0.9) == -0.9                          # closes immediately: no added latency
    assert [grip(v) for v in (0.8, 0.8, 0.8)] == [-1.0, -1.0, -1.0]  # re-opening within the dwell: held
    assert grip(0.8) == 0.8                            # dwell over: opens
    assert grip(-1.0) == 1.0 and grip(0.95) == 0.95    # a 1-period close blip is ignored


def test_joint_limit_violation_is_a_protective_stop_reason():
    f = SafetyFilter(ee_limits(), SafetyConfig(joint_margin=0.05))
    obs = RobotObservation({}, np.zeros(7), np.array([0.0, 1.02]), 0, 0.0)
    assert f.check_state(obs) is None
    obs.joints = np.array([0.0, 1.2])
    assert "joint 1" in f.check_state(obs)


def test_watchdog_fires_once_at_its_deadline_and_not_while_fed():
    trips: list[tuple[float, str]] = []
    wd = Watchdog(0.05, lambda r: trips.append((time.monotonic(), r)))
    try:
        for _ in range(10):  # fed every 20 ms for 200 ms: never fires
            wd.feed()
            time.sleep(0.02)
        assert not trips
        last = time.monotonic()
        wd.feed()
        time.sleep(0.2)
        assert len(trips) == 1 and wd.tripped and "no fresh action" in trips[0][1]
        assert 0.05 <= trips[0][0] - last < 0.05 + 0.03
        wd.feed()  # a tripped watchdog stays tripped until reset
        time.sleep(0.1)
        assert len(trips) == 1
        wd.reset()
        assert not wd.tripped
    finally:
        wd.close()


def test_estop_by_call_and_by_signal_runs_callbacks_once():
    stops: list[str] = []
    es = EStop()
    es.add_callback(stops.append)
    try:
        es.trigger("button")
        es.trigger("again")
        assert es.wait(1.0)
        deadline = time.monotonic() + 1.0
        while not stops and time.monotonic() < deadline:
            time.sleep(0.005)
        assert stops == ["e-stop: button"]
    finally:
        es.close()

    assert threading.current_thread() is threading.main_thread()
    es = EStop()
    drv = PointMassDriver(realtime=False)
    drv.home(seed=0)
    es.add_callback(drv.stop)
    es.install_signal_handlers([signal.SIGUSR1])
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert es.wait(1.0) and es.reason == "signal SIGUSR1"
        deadline = time.monotonic() + 1.0
        while not drv.observe().stopped and time.monotonic() < deadline:
            time.sleep(0.005)
        obs = drv.observe()
        assert obs.stopped and "SIGUSR1" in obs.info["stop_reason"]
        drv.command(np.zeros(7))
        assert drv.counters["ignored_commands"] == 1  # latched until home()
    finally:
        es.close()
        drv.close()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
