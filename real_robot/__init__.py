"""Real-robot control bridge: drivers, safety layer, fixed-rate control loop, policy server and client.

Modules (each readable on its own):

=====================  ==================================================================================
``protocol``           versioned wire format: JSON header + raw array frames (no pickle), size limits
``auth``               CURVE key files (``python -m embodied_distill.real_robot.auth init``)
``rpc``                ZeroMQ request/reply server and client (auth on, loopback by default)
``server``             ``PolicyServer``: serve any Policy (``python -m embodied_distill.real_robot.server``)
``client``             ``RemotePolicy``: the Policy interface over the network (teachers, the bridge)
``driver``             ``RobotDriver`` protocol; ``SimDriver`` (ManiSkill in real time), ``PointMassDriver``,
                       ``RemoteDriver``
``robot_server``       the robot-side process behind ``RemoteDriver``
``template_driver``    a documented template for a real arm's SDK
``safety``             command filter (limits, velocity, acceleration, NaN hold, gripper debounce),
                       watchdog, e-stop
``estop``              the e-stop network endpoint and sender
``control_loop``       fixed-rate loop with chunk strategies and asynchronous inference; episode logging
``deployment``         config glue for ``python -m embodied_distill.deploy``
=====================  ==================================================================================

Imports here are lazy so that ``import embodied_distill.real_robot`` needs neither pyzmq nor a simulator.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RemotePolicy": "client", "PolicyServer": "server", "spawn_policy_server": "server",
    "RobotDriver": "driver", "RobotLimits": "driver", "RobotObservation": "driver", "SimDriver": "driver",
    "PointMassDriver": "driver", "RemoteDriver": "driver", "RobotServer": "robot_server",
    "SafetyConfig": "safety", "SafetyFilter": "safety", "Watchdog": "safety", "EStop": "safety",
    "ControlLoop": "control_loop", "ControlLoopConfig": "control_loop", "EpisodeLogger": "control_loop",
    "ServerConfig": "rpc", "ClientConfig": "rpc",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
