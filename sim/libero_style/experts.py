"""Scripted experts derived from a task's goal, with privileged state, acting in LIBERO's action space.

Every goal predicate maps to a skill, and a goal with several predicates runs them in order:

- ``On(a, b)`` / ``In(a, c)``: pick ``a`` (approach above, align the fingers with its faces, descend,
  close) and place it (lift to a safe height, carry, lower, open, retreat upward);
- ``Lifted(a, h)``: pick ``a`` and hold it ``h`` + 5 cm above the table;
- ``PushedTo(a, r)``: close the gripper, go behind ``a`` on the line from ``a`` to the region's centre,
  and push until ``a`` is well inside the region, then retreat.

Each skill is a small state machine that reads the scene every step (so it re-grasps a dropped object
and re-aims a push that drifted). Actions are (7,) in [-1, 1] (see ``controller.py``).
"""

from __future__ import annotations

import math

import mujoco
import numpy as np
from embodied_distill.sim.libero_style.assets import FLOOR_THICKNESS
from embodied_distill.sim.libero_style.predicates import LIFT_HEIGHT, SceneView, holds
from embodied_distill.sim.libero_style.spec import Predicate, TaskSpec

SAFE_Z = 0.13          # end-effector height for moving above objects (clears the basket's rim)
CARRY_Z = 0.17         # height for carrying a grasped object
POS_SCALE = 0.05       # metres per unit translation action (OSCConfig.pos_scale)
ROT_SCALE = 0.5        # radians per unit rotation action (OSCConfig.rot_scale)
CLOSE_STEPS = 10       # control steps to close the gripper (it needs 8 at robosuite's speed)
OPEN_STEPS = 8


def down_rotation(yaw: float) -> np.ndarray:
    """(3, 3) end-effector orientation pointing straight down, finger axis (site x) at ``yaw``."""
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, s, 0.0], [s, -c, 0.0], [0.0, 0.0, -1.0]])


def finger_yaw(rot: np.ndarray) -> float:
    """Heading of the finger axis (site x) of an end-effector rotation."""
    return math.atan2(rot[1, 0], rot[0, 0])


HOME_YAW = math.pi / 2  # finger heading at the home pose (env.HOME_QPOS)


def nearest_yaw(yaw: float, period: float) -> float:
    """The heading equivalent to ``yaw`` modulo ``period`` closest to the home heading (keeps the wrist
    joint far from its limits)."""
    return HOME_YAW + wrap(yaw - HOME_YAW, period)


def wrap(angle: float, period: float) -> float:
    """``angle`` wrapped into [-period / 2, period / 2)."""
    return (angle + period / 2) % period - period / 2


def rotation_action(current: np.ndarray, goal: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """(3,) rotation action turning ``current`` toward ``goal`` (world-frame axis-angle, scaled)."""
    err = goal @ current.T
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, err.reshape(-1))
    if quat[0] < 0:
        quat = -quat
    angle = 2 * math.atan2(float(np.linalg.norm(quat[1:])), float(quat[0]))
    if angle < 1e-9:
        return np.zeros(3)
    axis = quat[1:] / np.linalg.norm(quat[1:])
    return np.clip(axis * angle * gain / ROT_SCALE, -1.0, 1.0)


def move_action(scene: SceneView, target: np.ndarray, yaw: float, grip: float,
                gain: float = 1.0) -> np.ndarray:
    """Action moving the end effector toward ``target`` with the fingers at ``yaw``."""
    a = np.zeros(7)
    a[:3] = np.clip((target - scene.ee_pos()) * gain / POS_SCALE, -1.0, 1.0)
    a[3:6] = rotation_action(scene.ee_rot(), down_rotation(yaw))
    a[6] = grip
    return a


class Skill:
    """One goal predicate's behaviour; ``act`` returns the next action, ``done`` when it is achieved."""

    def __init__(self, task: TaskSpec, predicate: Predicate):
        self.task, self.p = task, predicate
        self.phase = "start"
        self.timer = 0

    def act(self, s: SceneView) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def done(self, s: SceneView) -> bool:
        return self.phase == "finished"

    def _go(self, phase: str) -> None:
        self.phase, self.timer = phase, 0


class PickSkill(Skill):
    """Pick ``args[0]``; subclasses decide what to do once it is held (``holding``)."""

    def __init__(self, task: TaskSpec, predicate: Predicate):
        super().__init__(task, predicate)
        self.obj = str(predicate.args[0])
        self.spec = task.object(self.obj)
        self.yaw = 0.0
        self.grasp_offset = 0.0  # ee z minus object z at the grasp

    def grasp_yaw(self, s: SceneView) -> float:
        """Finger heading closest to the current one that grips the object across two faces."""
        if self.spec.kind == "cube":
            return nearest_yaw(s.yaw(self.obj), math.pi / 2)
        return nearest_yaw(finger_yaw(s.ee_rot()), math.pi)  # round objects: any heading

    def grasp_z(self, s: SceneView) -> float:
        z = s.pos(self.obj)[2]
        return z if self.spec.kind == "cube" else z + self.spec.half_height - 0.025

    def act(self, s: SceneView) -> np.ndarray:
        self.timer += 1
        ee, obj = s.ee_pos(), s.pos(self.obj)
        if self.phase == "start":
            self._go("approach")
        if self.phase in ("approach", "descend"):
            self.yaw = self.grasp_yaw(s)
            above = np.array([obj[0], obj[1], max(SAFE_Z, s.top(self.obj) + 0.06)])
            xy_err = float(np.linalg.norm(ee[:2] - obj[:2]))
            if self.phase == "approach":
                if xy_err > 0.02 and ee[2] < above[2] - 0.03:  # too low to move sideways: rise first
                    return move_action(s, np.array([ee[0], ee[1], above[2]]), self.yaw, -1.0)
                if xy_err < 0.006 and abs(ee[2] - above[2]) < 0.03 and s.finger_opening() > 0.07:
                    self._go("descend")
                return move_action(s, above, self.yaw, -1.0)
            target = np.array([obj[0], obj[1], self.grasp_z(s)])
            if xy_err > 0.015:
                self._go("approach")
            elif abs(ee[2] - target[2]) < 0.006 or self.timer > 40:
                self._go("close")
            return move_action(s, target, self.yaw, -1.0)
        if self.phase == "close":
            if self.timer >= CLOSE_STEPS:
                if s.is_grasped(self.obj):
                    self.grasp_offset = float(ee[2] - obj[2])
                    self._go("holding")
                else:
                    self._go("reopen")
            return move_action(s, np.array([obj[0], obj[1], self.grasp_z(s)]), self.yaw, 1.0)
        if self.phase == "reopen":
            if self.timer >= OPEN_STEPS:
                self._go("approach")
            return move_action(s, np.array([ee[0], ee[1], ee[2] + 0.02]), self.yaw, -1.0)
        if self.phase not in ("retreat", "finished") and not s.is_grasped(self.obj) and self.needs_grasp():
            self._go("reopen")  # dropped it
            return move_action(s, ee, self.yaw, -1.0)
        return self.holding(s)

    def needs_grasp(self) -> bool:
        return True

    def holding(self, s: SceneView) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class PlaceSkill(PickSkill):
    """``On(a, b)`` and ``In(a, c)``: pick ``a``, carry it over ``b``, lower it, release, retreat."""

    def __init__(self, task: TaskSpec, predicate: Predicate):
        super().__init__(task, predicate)
        self.dest = str(predicate.args[1])

    def release_height(self, s: SceneView) -> float:
        """Object-centre height at which the gripper opens."""
        half = self.spec.half_height
        if self.p.name == "On":
            return s.top(self.dest) + half + 0.006
        dest = self.task.object(self.dest)
        floor = s.pos(self.dest)[2] - dest.half_height + FLOOR_THICKNESS
        return floor + half + 0.012

    def needs_grasp(self) -> bool:
        return self.phase not in ("release", "retreat", "finished")

    def holding(self, s: SceneView) -> np.ndarray:
        ee, obj, dest = s.ee_pos(), s.pos(self.obj), s.pos(self.dest)
        if self.phase == "holding":
            self._go("lift")
        if self.phase == "lift":
            target = np.array([ee[0], ee[1], CARRY_Z])
            if ee[2] > CARRY_Z - 0.03:
                self._go("carry")
            return move_action(s, target, self.yaw, 1.0)
        # the object hangs at obj - ee below the gripper: aim the object, not the gripper
        offset = ee - obj
        if self.phase == "carry":
            target = np.array([dest[0], dest[1], CARRY_Z - offset[2]]) + offset
            if float(np.linalg.norm(obj[:2] - dest[:2])) < 0.008:
                self._go("lower")
            return move_action(s, target, self.yaw, 1.0)
        if self.phase == "lower":
            goal_z = self.release_height(s)
            target = np.array([dest[0], dest[1], goal_z]) + offset
            if float(np.linalg.norm(obj[:2] - dest[:2])) > 0.02:
                self._go("carry")
            elif obj[2] < goal_z + 0.004 or self.timer > 40:
                self._go("release")
            return move_action(s, target, self.yaw, 1.0, gain=0.7)
        if self.phase == "release":
            if self.timer >= OPEN_STEPS:
                self._go("retreat")
            return move_action(s, ee, self.yaw, -1.0)
        if self.phase == "retreat":
            if ee[2] > SAFE_Z - 0.01:
                self._go("finished")
            return move_action(s, np.array([ee[0], ee[1], SAFE_Z]), self.yaw, -1.0)
        return move_action(s, ee, self.yaw, -1.0)  # finished: hold still

    def done(self, s: SceneView) -> bool:
        return self.phase == "finished" and holds(self.p, s)


class LiftSkill(PickSkill):
    """``Lifted(a, h)``: pick ``a`` and hold it above ``h``."""

    def holding(self, s: SceneView) -> np.ndarray:
        ee = s.ee_pos()
        height = float(self.p.args[1]) if len(self.p.args) > 1 else LIFT_HEIGHT
        target_z = height + 0.05 + self.spec.half_height + max(0.0, self.grasp_offset)
        if self.phase == "holding" and ee[2] >= target_z - 0.01:
            self._go("finished")
        return move_action(s, np.array([ee[0], ee[1], target_z]), self.yaw, 1.0)

    def done(self, s: SceneView) -> bool:
        return self.phase == "finished" and holds(self.p, s)


class PushSkill(Skill):
    """``PushedTo(a, r)``: push ``a`` along the line to the region's centre with the closed gripper."""

    PUSH_Z = 0.018       # end-effector height while pushing (fingertips just above the table)
    STANDOFF = 0.035     # gap between the object's footprint and the fingers before pushing

    def __init__(self, task: TaskSpec, predicate: Predicate):
        super().__init__(task, predicate)
        self.obj = str(predicate.args[0])
        self.region = task.region(str(predicate.args[1]))
        self.radius = task.object(self.obj).half_height  # cubes and cans: half width ~ half height

    def act(self, s: SceneView) -> np.ndarray:
        self.timer += 1
        ee, obj = s.ee_pos(), s.pos(self.obj)
        goal = np.array(self.region.center)
        delta = goal - obj[:2]
        dist = float(np.linalg.norm(delta))
        direction = delta / max(dist, 1e-6)
        yaw = nearest_yaw(math.atan2(direction[1], direction[0]) + math.pi / 2, math.pi)  # fingers across
        behind = obj[:2] - direction * (self.radius + self.STANDOFF)
        rel = ee[:2] - obj[:2]
        along = float(rel @ direction)
        lateral = float(np.linalg.norm(rel - along * direction))
        if self.phase == "start":
            self._go("approach")
        inside = self.region.contains(obj[:2], margin=min(self.region.half_size) * 0.5)
        if self.phase in ("approach", "descend", "push") and inside:
            self._go("retreat")
        if self.phase == "approach":
            if float(np.linalg.norm(ee[:2] - behind)) > 0.02 and ee[2] < SAFE_Z - 0.05:
                return move_action(s, np.array([ee[0], ee[1], SAFE_Z - 0.04]), yaw, 1.0)
            if float(np.linalg.norm(ee[:2] - behind)) < 0.008:
                self._go("descend")
            return move_action(s, np.array([*behind, SAFE_Z - 0.04]), yaw, 1.0)
        if self.phase == "descend":
            if float(np.linalg.norm(ee[:2] - behind)) > 0.02:
                self._go("approach")
            elif ee[2] < self.PUSH_Z + 0.006:
                self._go("push")
            return move_action(s, np.array([*behind, self.PUSH_Z]), yaw, 1.0)
        if self.phase == "push":
            if lateral > 0.02 or along > 0:  # slid off the line: go around again
                self._go("approach")
                return move_action(s, np.array([ee[0], ee[1], SAFE_Z - 0.04]), yaw, 1.0)
            target = ee[:2] + direction * min(0.03, dist + 0.01) - 0.5 * (rel - along * direction)
            return move_action(s, np.array([*target, self.PUSH_Z]), yaw, 1.0, gain=0.8)
        if self.phase == "retreat":
            if ee[2] > SAFE_Z - 0.05:
                self._go("finished")
            return move_action(s, np.array([ee[0], ee[1], SAFE_Z - 0.04]), yaw, 1.0)
        return move_action(s, ee, yaw, 1.0)

    def done(self, s: SceneView) -> bool:
        return self.phase == "finished" and holds(self.p, s)


SKILLS: dict[str, type[Skill]] = {"On": PlaceSkill, "In": PlaceSkill, "Lifted": LiftSkill,
                                  "PushedTo": PushSkill}


class ScriptedExpert:
    """Runs one skill per goal predicate, in the goal's order; call ``reset`` at every episode start."""

    def __init__(self, task: TaskSpec):
        self.task = task
        self.reset()

    def reset(self) -> None:
        self.skills = [SKILLS[p.name](self.task, p) for p in self.task.goal]
        self.index = 0

    def act(self, scene: SceneView) -> np.ndarray:
        """(7,) action in [-1, 1] for the scene's current state."""
        while self.index < len(self.skills) - 1 and self.skills[self.index].done(scene):
            self.index += 1
        return self.skills[self.index].act(scene).astype(np.float32)

    @property
    def phase(self) -> str:
        return f"{self.index}:{self.skills[self.index].phase}"
