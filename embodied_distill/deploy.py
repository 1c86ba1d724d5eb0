"""Deployment entry point: ``python -m embodied_distill.deploy checkpoint=DIR robot=sim task=pickcube``.

Composes ``configs/deploy.yaml`` with Hydra and, by ``mode``:

* ``run`` (default): runs ``episodes`` of the checkpoint on the ``robot=`` driver through the safe,
  fixed-rate control loop of ``embodied_distill.real_robot`` (``robot=sim``: ManiSkill in real time;
  ``robot=remote robot.address=tcp://HOST:PORT``: a robot-side process; ``robot=pointmass``: a dry run
  without a simulator). The policy runs here (``policy.source=local``), in a policy-server process on
  loopback (``server``) or on a running server (``remote policy.address=...``). Writes ``report.json``
  and every episode to ``episodes.zarr`` in the run directory.
* ``serve``: the authenticated policy server for ``checkpoint`` (same as
  ``python -m embodied_distill.real_robot.server``).
* ``robot``: the robot-side server for the ``robot=`` driver (same as
  ``python -m embodied_distill.real_robot.robot_server``).

The robot bridge itself lives in ``real_robot/``; nothing here imports it at module top.
"""

from __future__ import annotations


def main() -> None:
    from embodied_distill.real_robot.deployment import hydra_entry

    hydra_entry()


if __name__ == "__main__":
    main()
