"""Goal predicates of the LIBERO-style tasks, evaluated on the MuJoCo state.

All heights are relative to the table top (z = 0). Tolerances are in metres.

- ``On(a, b)``: ``a`` rests on ``b``'s top face: its lowest point is within ``ON_TOL`` of ``b``'s top,
  its centre is over ``b``'s top face, it touches ``b``, no finger touches it, and it moves slower
  than ``REST_SPEED``.
- ``In(a, c)``: ``a``'s centre is inside container ``c``'s inner walls, its lowest point lies between
  ``c``'s floor and rim, and no finger touches it.
- ``Lifted(a, h=0.08)``: ``a``'s lowest point is at least ``h`` above the table.
- ``PushedTo(a, r)``: ``a``'s centre lies in region ``r`` and ``a`` stands on the table
  (lowest point within ``ON_TOL`` of z = 0).
"""

from __future__ import annotations

import math

import mujoco
import numpy as np
from embodied_distill.sim.libero_style import assets
from embodied_distill.sim.libero_style.spec import Predicate, TaskSpec

ON_TOL = 0.012
REST_SPEED = 0.1
LIFT_HEIGHT = 0.08


class SceneView:
    """Read-only geometric queries on one task's MuJoCo state (also used by the scripted experts)."""

    def __init__(self, task: TaskSpec, model: mujoco.MjModel, data: mujoco.MjData):
        self.task, self.m, self.d = task, model, data
        self.body = {o.name: model.body(o.name).id for o in task.objects}
        self.dof = {o.name: model.jnt_dofadr[model.joint(f"{o.name}_joint").id] for o in task.objects}
        self.geoms = {name: set(np.flatnonzero(model.geom_bodyid == bid).tolist())
                      for name, bid in self.body.items()}
        finger1 = {model.geom(g).id for g in assets.FINGER_GEOMS if "1" in g}
        finger2 = {model.geom(g).id for g in assets.FINGER_GEOMS if "2" in g}
        self.fingers = (finger1, finger2)
        self.ee_site = model.site(assets.EE_SITE).id

    # --------------------------------------------------------------------------- poses
    def pos(self, name: str) -> np.ndarray:
        """(3,) world position of the object's origin (centre of its bounding box)."""
        return self.d.xpos[self.body[name]].copy()

    def rot(self, name: str) -> np.ndarray:
        """(3, 3) world rotation of the object."""
        return self.d.xmat[self.body[name]].reshape(3, 3).copy()

    def yaw(self, name: str) -> float:
        r = self.rot(name)
        return math.atan2(r[1, 0], r[0, 0])

    def speed(self, name: str) -> float:
        adr = self.dof[name]
        return float(np.linalg.norm(self.d.qvel[adr:adr + 3]))

    def bottom(self, name: str) -> float:
        """Lowest point of the object (any orientation) above the table top, metres."""
        obj, r, z = self.task.object(name), self.rot(name), self.pos(name)[2]
        if obj.kind == "cube":
            return z - obj.param("size") * float(np.abs(r[2, :]).sum())
        if obj.kind == "basket":
            half = np.array([obj.param("half_x"), obj.param("half_y"), obj.param("height") / 2])
            return z - float(np.abs(r[2, :]) @ half)
        radius, half_h = obj.param("radius"), obj.param("height") / 2  # cylinders (can, plate, bowl)
        c = min(1.0, abs(float(r[2, 2])))
        return z - (c * half_h + math.sqrt(max(0.0, 1 - c * c)) * radius)

    def top(self, name: str) -> float:
        """Height of the object's top face above the table (upright objects)."""
        return float(self.pos(name)[2] + self.task.object(name).half_height)

    def ee_pos(self) -> np.ndarray:
        return self.d.site_xpos[self.ee_site].copy()

    def ee_rot(self) -> np.ndarray:
        return self.d.site_xmat[self.ee_site].reshape(3, 3).copy()

    def finger_opening(self) -> float:
        """Distance between the fingers' joints (0 closed, 0.08 fully open), metres."""
        return float(self.d.qpos[7] - self.d.qpos[8])

    # --------------------------------------------------------------------------- contacts
    def _contact_pairs(self) -> list[tuple[int, int]]:
        n = self.d.ncon
        return list(zip(self.d.contact.geom1[:n].tolist(), self.d.contact.geom2[:n].tolist()))

    def touching(self, a: str, b: str) -> bool:
        ga, gb = self.geoms[a], self.geoms[b]
        return any((g1 in ga and g2 in gb) or (g1 in gb and g2 in ga) for g1, g2 in self._contact_pairs())

    def finger_contacts(self, name: str) -> tuple[bool, bool]:
        """Whether finger 1 / finger 2 touch the object."""
        g = self.geoms[name]
        hit = [False, False]
        for g1, g2 in self._contact_pairs():
            other = g2 if g1 in g else g1 if g2 in g else None
            if other is None:
                continue
            for i in range(2):
                hit[i] |= other in self.fingers[i]
        return hit[0], hit[1]

    def is_grasped(self, name: str) -> bool:
        """Both fingers touch the object."""
        return all(self.finger_contacts(name))

    def is_touched_by_gripper(self, name: str) -> bool:
        return any(self.finger_contacts(name))

    # --------------------------------------------------------------------------- geometry
    def over_support(self, a: str, b: str, margin: float = 0.0) -> bool:
        """Whether ``a``'s centre lies above ``b``'s top face (shrunk by ``margin``)."""
        ob = self.task.object(b)
        rel = self.pos(a)[:2] - self.pos(b)[:2]
        if ob.kind in ("plate", "can"):
            return float(np.linalg.norm(rel)) <= ob.param("radius") - margin
        yaw = self.yaw(b)
        local = np.array([math.cos(yaw) * rel[0] + math.sin(yaw) * rel[1],
                          -math.sin(yaw) * rel[0] + math.cos(yaw) * rel[1]])
        return bool(np.all(np.abs(local) <= ob.param("size") - margin))

    def inside_container(self, a: str, c: str) -> bool:
        """Whether ``a``'s centre is within container ``c``'s inner walls (seen from above)."""
        oc = self.task.object(c)
        rel = self.pos(a)[:2] - self.pos(c)[:2]
        wall = oc.param("wall")
        if oc.kind == "bowl":
            return float(np.linalg.norm(rel)) <= oc.param("radius") - wall
        yaw = self.yaw(c)
        local = np.array([math.cos(yaw) * rel[0] + math.sin(yaw) * rel[1],
                          -math.sin(yaw) * rel[0] + math.cos(yaw) * rel[1]])
        return bool(abs(local[0]) <= oc.param("half_x") - wall and abs(local[1]) <= oc.param("half_y") - wall)


# ------------------------------------------------------------------------------- predicates
def holds(p: Predicate, s: SceneView) -> bool:
    """Whether predicate ``p`` holds in the scene's current state."""
    return bool(_holds(p, s))


def _holds(p: Predicate, s: SceneView) -> bool:
    a = str(p.args[0])
    if p.name == "On":
        b = str(p.args[1])
        return (abs(s.bottom(a) - s.top(b)) < ON_TOL and s.over_support(a, b) and s.touching(a, b)
                and not s.is_touched_by_gripper(a) and s.speed(a) < REST_SPEED)
    if p.name == "In":
        c = str(p.args[1])
        oc = s.task.object(c)
        floor = s.pos(c)[2] - oc.half_height + assets.FLOOR_THICKNESS
        rim = s.pos(c)[2] + oc.half_height
        return (s.inside_container(a, c) and floor - ON_TOL < s.bottom(a) < rim
                and not s.is_touched_by_gripper(a))
    if p.name == "Lifted":
        height = float(p.args[1]) if len(p.args) > 1 else LIFT_HEIGHT
        return s.bottom(a) >= height
    if p.name == "PushedTo":
        region = s.task.region(str(p.args[1]))
        return region.contains(s.pos(a)[:2]) and abs(s.bottom(a)) < ON_TOL
    raise ValueError(f"unknown predicate {p.name!r}")


def goal_satisfied(s: SceneView) -> bool:
    """All goal predicates of the task hold."""
    return all(holds(p, s) for p in s.task.goal)


def goal_report(s: SceneView) -> dict[str, bool]:
    """``{"On(a, b)": True, ...}`` for debugging and tests."""
    return {str(p): holds(p, s) for p in s.task.goal}
