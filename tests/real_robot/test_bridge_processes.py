"""Real processes and sockets: kill the policy process / the deploy process and the robot stops within two
control periods; fuzzed policy outputs over the network never reach the robot out of limits; the deploy
CLI end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from bridge_helpers import ScriptedConfig
from embodied_distill.real_robot.client import RemotePolicy
from embodied_distill.real_robot.control_loop import ControlLoop, ControlLoopConfig
from embodied_distill.real_robot.driver import PointMassDriver, RemoteDriver
from embodied_distill.real_robot.protocol import RemoteError
from embodied_distill.real_robot.robot_server import READY_PREFIX as ROBOT_READY
from embodied_distill.real_robot.rpc import ServerConfig
from embodied_distill.real_robot.safety import SafetyConfig
from embodied_distill.real_robot.server import PolicyServer, spawn_policy_server, spawn_server_process
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embodied_distill.data.episode_store import EpisodeStore

HZ, P = 20.0, 0.05
TOLERANCE_S = 0.025  # thread wake-up on a loaded 2-core machine


def test_watchdog_stops_the_robot_within_two_periods_when_the_policy_process_is_killed(
        pointmass_checkpoint, keys_dir):
    server = spawn_policy_server(pointmass_checkpoint, ServerConfig(port=0, keys_dir=keys_dir))
    drv = PointMassDriver(control_hz=HZ, max_episode_steps=400)
    killed: dict[str, float] = {}

    def kill_policy_process() -> None:
        time.sleep(1.0)
        killed["at"] = time.monotonic()
        os.kill(server.pid, signal.SIGKILL)

    try:
        policy = RemotePolicy(server.address, keys_dir=keys_dir, timeout_s=1.0)
        cfg = ControlLoopConfig(strategy="temporal_ensemble")  # a policy request every tick
        with ControlLoop(drv, policy, cfg, SafetyConfig(watchdog_periods=2.0)) as loop:
            killer = threading.Thread(target=kill_policy_process)
            killer.start()
            r = loop.run_episode(seed=0)
            killer.join()
        policy.close()
        obs = drv.observe()
        assert obs.stopped and "no fresh action" in obs.info["stop_reason"], obs.info
        delay = obs.info["stopped_at"] - killed["at"]
        print(f"policy killed -> robot stopped: {delay * 1e3:.1f} ms (limit {2 * P * 1e3:.0f} ms)")
        assert delay <= 2 * P + TOLERANCE_S, f"stopped {delay * 1e3:.1f} ms after the kill"
        assert obs.info["stopped_at"] - r.last_fresh_at <= 2 * P + TOLERANCE_S
        assert r.steps >= 10 and r.end_reason.startswith(("watchdog", "robot stopped"))
        held = drv.observe().position[:3]
        time.sleep(3 * P)
        np.testing.assert_allclose(drv.observe().position[:3], held)  # it stays stopped
    finally:
        server.close()
        drv.close()


def test_robot_side_watchdog_stops_the_robot_when_the_deploy_process_is_killed(
        pointmass_checkpoint, keys_dir, tmp_path):
    robot = spawn_server_process("embodied_distill.real_robot.robot_server", [
        "robot=pointmass", "robot.driver.max_episode_steps=1000", f"server.keys_dir={keys_dir}",
        "robot_server.port=0", "robot_server.watchdog_periods=2"], ready_prefix=ROBOT_READY)
    deploy = None
    try:
        deploy = subprocess.Popen(
            [sys.executable, "-m", "embodied_distill.deploy", f"checkpoint={pointmass_checkpoint}",
             "robot=remote", f"robot.address={robot.address}", f"server.keys_dir={keys_dir}", "episodes=1",
             "estop.endpoint=false", f"hydra.run.dir={tmp_path / 'run'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        observer = RemoteDriver(address=robot.address, keys_dir=keys_dir)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                obs = observer.observe()
                if obs.info.get("last_command_at") and obs.seq > 5:
                    break
            except RemoteError:  # not homed yet
                pass
            assert deploy.poll() is None, deploy.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        killed_at = time.monotonic()
        deploy.kill()
        deploy.wait(10)
        while not (obs := observer.observe()).stopped and time.monotonic() < killed_at + 2:
            time.sleep(0.01)
        info = obs.info
        assert obs.stopped and "robot-watchdog" in info["stop_reason"], info
        print(f"deploy killed -> robot stopped: {(info['stopped_at'] - killed_at) * 1e3:.1f} ms, "
              f"{(info['stopped_at'] - info['last_command_at']) * 1e3:.1f} ms after the last command")
        assert info["stopped_at"] - info["last_command_at"] <= 2 * P + TOLERANCE_S
        assert info["stopped_at"] - killed_at <= 2 * P + TOLERANCE_S
        with pytest.raises(RemoteError) as e:  # another client cannot command a robot it does not own
            observer.command(np.zeros(7), obs.seq)
        assert e.value.code == "busy"
        observer.close()
    finally:
        if deploy is not None and deploy.poll() is None:
            deploy.kill()
        robot.close()


class Replay:
    """Serves whatever chunks the test sets: the fuzzer's stand-in for a broken policy."""

    name = "replay"

    def __init__(self):
        self.config = ScriptedConfig(action_horizon=8, n_action_steps=8)
        self.chunks: list[np.ndarray] = []
        self.i = 0

    def reset(self):
        self.i = 0

    def predict_action_chunk(self, obs):
        chunk = self.chunks[min(self.i, len(self.chunks) - 1)]
        self.i += 1
        return torch.from_numpy(chunk[None].astype(np.float32))


@pytest.fixture(scope="module")
def fuzz_rig(keys_dir):
    policy = Replay()
    server = PolicyServer(policy, ServerConfig(port=0, keys_dir=keys_dir)).start()
    remote = RemotePolicy(server.address, keys_dir=keys_dir)
    drv = PointMassDriver(realtime=False, max_episode_steps=16, max_speed=0.5, max_accel=5.0)
    loop = ControlLoop(drv, remote, ControlLoopConfig(rate_hz=500, warmup=False),
                       SafetyConfig(watchdog_periods=50))
    yield policy, drv, loop
    loop.close()
    remote.close()
    drv.close()
    server.stop()


values = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.floats(-3, 3),
                   st.sampled_from([1e30, -1e30, 0.0]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.lists(values, min_size=56, max_size=56), min_size=2, max_size=2),
       seed=st.integers(0, 99))
def test_fuzzed_policy_outputs_over_the_network_never_reach_the_robot_out_of_limits(fuzz_rig, chunks, seed):
    policy, drv, loop = fuzz_rig
    policy.chunks = [np.array(c, np.float64).reshape(8, 7) for c in chunks]
    drv.received.clear()
    loop.run_episode(seed=seed)
    lim = drv.limits()
    vstep = lim.max_velocity[:3] * lim.period_s
    for _, _, cmd in drv.received:
        assert np.isfinite(cmd).all()
        assert (cmd >= lim.command_low).all() and (cmd <= lim.command_high).all()
        assert (np.abs(cmd[:3] * lim.delta_scale[:3]) <= vstep + 1e-9).all()
    assert drv.counters["workspace_violations"] == 0 and drv.counters["out_of_limit_commands"] == 0
    assert drv.counters["rejected_commands"] == 0


def _deploy(args, tmp_path, timeout=240):
    cmd = [sys.executable, "-m", "embodied_distill.deploy", *args, "estop.port=0",
           f"hydra.run.dir={tmp_path / 'run'}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def test_deploy_cli_through_a_policy_server_process_logs_every_episode(pointmass_checkpoint, keys_dir,
                                                                       tmp_path):
    out = _deploy([f"checkpoint={pointmass_checkpoint}", "robot=pointmass",
                   "robot.driver.max_episode_steps=20", "episodes=2", "policy.source=server",
                   f"server.keys_dir={keys_dir}",
                   "control.strategy=temporal_ensemble", "control.async_inference=true"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["episodes"] == 2 and report["seed_start"] == 1000 and "server process" in report["policy"]
    assert report["jitter_ms_p99"] is not None and report["inference_ms_p50"] > 0
    store = EpisodeStore(tmp_path / "run" / "episodes.zarr", mode="r")
    assert store.n_episodes == 2 and store.get_episode(1)["action"].shape == (20, 7)
    assert "success rate" in out.stdout


@pytest.mark.sim
@pytest.mark.slow
def test_deploy_cli_on_the_maniskill_sim_driver(pickcube_checkpoint, keys_dir, tmp_path):
    out = _deploy([f"checkpoint={pickcube_checkpoint}", "robot=sim", "task=pickcube", "episodes=1",
                   f"server.keys_dir={keys_dir}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["episodes"] == 1 and report["task"] == "pickcube" and report["success_rate"] in (0.0, 1.0)
    assert report["steps"] == 50 and report["missed_periods"] <= 3
    store = EpisodeStore(tmp_path / "run" / "episodes.zarr", mode="r")
    assert store.get_episode(0)["state"].shape == (50, 42)
