"""TEMPLATE (not a working driver): how to put a real arm's Python SDK behind ``RobotDriver``.

The vendor SDK cannot be installed here, so every method below raises ``NotImplementedError`` with
what to write. Copy this file to ``real_robot/<arm>_driver.py``, replace the ``vendor_sdk`` calls, add
``configs/robot/<arm>.yaml``::

    name: myarm
    driver:
      _target_: embodied_distill.real_robot.myarm_driver.MyArmDriver
      _partial_: true                 # the deploy entry point passes task=...
      host: 192.168.1.10
      control_hz: 20.0

and deploy with ``python -m embodied_distill.deploy checkpoint=DIR robot=myarm`` (on the robot computer),
or serve it with ``python -m embodied_distill.real_robot.robot_server robot=myarm robot_server.host=...``
and deploy from a GPU machine with ``robot=remote robot.address=tcp://ROBOT:5570``.

What a driver must guarantee (the control loop and safety layer rely on it):

* ``command()`` never blocks longer than a fraction of a control period: hand the target to the SDK's
  real-time thread (libfranka-style callbacks, xArm/UR servo modes) and return.
* The arm's own controller keeps running between commands. If no command arrives for a period, it must
  hold (zero velocity / last position target); most SDKs have a command timeout for this, set it to
  about two control periods.
* ``stop()`` must work from any thread, at any time, even while ``command()`` runs in another thread,
  and must latch: ignore commands until ``home()``. Prefer the SDK's protective stop over a hard e-stop
  (which cuts power) unless the caller asks for an e-stop.
* ``observe()`` returns a state sampled within the last control period, stamped with
  ``time.monotonic()`` at sampling (not at the call), and ``position`` in the same units and frame as
  the limits (end-effector xyz in the robot base frame for delta-pose control, joint angles for joint
  control, the gripper opening in command units).
* ``limits()`` describes the hardware honestly (datasheet velocity / acceleration limits, a workspace
  box that keeps the gripper off the table). The safety layer enforces them; a deployment can only
  tighten them (``safety.velocity_scale``, ``safety.workspace_low/high``).
* Camera images go in ``RobotObservation.data`` under the keys the policy reads (e.g. ``"rgb"``,
  (H, W, 3) uint8), resized / cropped exactly as in training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from embodied_distill.real_robot.driver import RobotLimits, RobotObservation

_HINT = ("TemplateArmDriver is a template, not a driver: copy real_robot/template_driver.py, replace the "
         "vendor_sdk calls with your arm's SDK, and point configs/robot/<arm>.yaml at the new class")


def example_limits(control_hz: float = 20.0) -> RobotLimits:
    """Limits for end-effector delta-pose control of a Franka Panda-like arm, as a starting point.

    Commands are 7-D in [-1, 1]: xyz steps of up to 1 cm per period, rotation steps of up to 0.05 rad,
    gripper (+1 open, -1 closed). Velocity / acceleration limits are the Panda datasheet's Cartesian
    limits (1.7 m/s, 13 m/s^2, 2.5 rad/s, 25 rad/s^2) scaled down to half for a first deployment.
    """
    inf = np.inf
    return RobotLimits(
        control_hz=control_hz, dim_kinds=("delta",) * 6 + ("gripper",),
        command_low=-np.ones(7), command_high=np.ones(7), delta_scale=[0.01] * 3 + [0.05] * 3 + [1.0],
        position_low=[0.30, -0.40, 0.02, -inf, -inf, -inf, -inf],
        position_high=[0.75, 0.40, 0.60, inf, inf, inf, inf],
        max_velocity=[0.85] * 3 + [1.25] * 3 + [inf], max_acceleration=[6.5] * 3 + [12.5] * 3 + [inf],
        workspace_dims=(0, 1, 2),
        joint_low=[-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973],
        joint_high=[2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973])


class TemplateArmDriver:
    """TEMPLATE / MOCK of a real-arm driver; every robot-facing method raises ``NotImplementedError``.

    Args:
        task: the task config (unused by real robots, except to check the control mode).
        host: the arm controller's address.
        control_hz: the rate the control loop will command at.
    """

    def __init__(self, task: Mapping[str, Any] | None = None, *, host: str = "192.168.1.10",
                 control_hz: float = 20.0):
        self.host, self.control_hz = host, control_hz
        # Replace with, e.g.:
        #   import vendor_sdk                                   # import inside, never at module top
        #   self.arm = vendor_sdk.Arm(host)
        #   self.arm.set_mode(vendor_sdk.Mode.CARTESIAN_VELOCITY, timeout_s=2 / control_hz)
        #   self.gripper = vendor_sdk.Gripper(host)
        #   self._stopped = threading.Event()
        self._limits = example_limits(control_hz)

    def limits(self) -> RobotLimits:
        # Fill from the datasheet / SDK (``arm.get_joint_limits()``); keep the workspace conservative.
        return self._limits

    def home(self, seed: int | None = None) -> RobotObservation:
        # arm.move_to_joint_positions(HOME_Q, speed=0.2); gripper.open(); clear the stop latch;
        # return self.observe(). ``seed`` is meaningless on hardware (reset the scene by hand).
        raise NotImplementedError(f"home(): move to the home pose with the SDK and return observe(). {_HINT}")

    def observe(self) -> RobotObservation:
        # state = arm.read_state()  (sampled by the SDK's real-time thread)
        # return RobotObservation(data={"state": <the policy's state vector>, "rgb": <camera frame>},
        #                         position=np.r_[ee_xyz_in_base, 0, 0, 0, gripper_in_command_units],
        #                         joints=state.q, seq=<period counter>, stamp=<time.monotonic() at sampling>,
        #                         success=None, stopped=self._stopped.is_set())
        raise NotImplementedError(f"observe(): read the SDK's latest state and cameras. {_HINT}")

    def command(self, action: np.ndarray, seq: int | None = None) -> None:
        # if self._stopped.is_set(): return
        # arm.set_cartesian_target_delta(action[:3] * 0.01, action[3:6] * 0.05)   # non-blocking
        # gripper.move(open=action[6] > 0)                                        # debounced upstream
        raise NotImplementedError(f"command(): hand the target to the SDK without blocking. {_HINT}")

    def stop(self, reason: str = "stop") -> None:
        # self._stopped.set(); arm.protective_stop()   # thread-safe, latched until home()
        raise NotImplementedError(f"stop(): trigger the SDK's protective stop and latch it. {_HINT}")

    def close(self) -> None:
        # arm.disconnect()
        pass
