"""LIBERO's arm controller: robosuite-style operational-space control (OSC_POSE) with delta inputs.

A 7-D action ``a`` in [-1, 1] is read as LIBERO reads it::

    a[0:3]  end-effector translation, scaled by ``pos_scale`` (0.05 m at |a| = 1), world frame
    a[3:6]  end-effector rotation as an axis-angle vector, scaled by ``rot_scale`` (0.5 rad), world frame
    a[6]    gripper: -1 opens, +1 closes (the fingers move at a limited rate, as robosuite's gripper)

At every control step (20 Hz) the goal pose is set relative to the *current* pose
(``goal_p = p + dp``, ``goal_R = exp(dr) R``) and held for the simulation substeps between control
steps. Each substep computes joint torques (as robosuite's ``OperationalSpaceController``)::

    F   = kp * [goal_p - p, e_R(goal_R, R)] - kd * J qdot          (6,)   kd = 2 sqrt(kp) * damping
    tau = J^T Lambda F + N^T M (kp_null (q_home - q) - kd_null qdot) + bias(q, qdot)
    Lambda = (J M^-1 J^T)^-1 (position and orientation decoupled), N = I - J^T Jbar^T (null space)

with ``e_R`` robosuite's orientation error ``0.5 sum_i r_i x rd_i`` over the rotation matrices' columns.
"""

from __future__ import annotations

import dataclasses

import mujoco
import numpy as np


@dataclasses.dataclass(frozen=True)
class OSCConfig:
    """Gains and action scaling of the operational-space controller (robosuite/LIBERO defaults)."""

    kp: float = 150.0
    """Stiffness of the pose error (translation and rotation), > 0."""
    damping_ratio: float = 1.0
    """Critical damping at 1; kd = 2 sqrt(kp) * damping_ratio."""
    pos_scale: float = 0.05
    """Metres of goal offset for a translation action of 1."""
    rot_scale: float = 0.5
    """Radians of goal rotation for a rotation action of 1."""
    kp_null: float = 10.0
    """Stiffness of the null-space pull toward the home joint configuration."""
    gripper_speed: float = 0.01
    """Change of the gripper command per simulation substep (robosuite's PandaGripper speed)."""

    def __post_init__(self):
        if self.kp <= 0 or self.damping_ratio <= 0 or self.kp_null < 0:
            raise ValueError("OSC gains must be positive (kp, damping_ratio > 0, kp_null >= 0)")
        if self.pos_scale <= 0 or self.rot_scale <= 0 or not 0 < self.gripper_speed <= 1:
            raise ValueError("pos_scale and rot_scale must be > 0, gripper_speed in (0, 1]")


def orientation_error(goal: np.ndarray, current: np.ndarray) -> np.ndarray:
    """(3, 3), (3, 3) rotation matrices -> (3,) axis-like error that drives ``current`` to ``goal``:
    ``0.5 * sum_i cross(current[:, i], goal[:, i])`` (written out: np.cross is slow on tiny arrays)."""
    c, g = current, goal
    return 0.5 * np.array([
        (c[1] * g[2] - c[2] * g[1]).sum(),
        (c[2] * g[0] - c[0] * g[2]).sum(),
        (c[0] * g[1] - c[1] * g[0]).sum(),
    ])


def _spd_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve ``a x = b`` for a small symmetric positive-definite ``a`` with MuJoCo's Cholesky routines
    (LAPACK through numpy is ~10x slower on 3x3 / 6x6 matrices when OpenBLAS runs threaded)."""
    factor = np.ascontiguousarray(a, dtype=np.float64).copy()
    mujoco.mju_cholFactor(factor, 1e-10)
    out = np.empty(len(b))
    mujoco.mju_cholSolve(out, factor, np.ascontiguousarray(b, dtype=np.float64))
    return out


def axis_angle_to_matrix(v: np.ndarray) -> np.ndarray:
    """(3,) axis-angle vector -> (3, 3) rotation matrix (Rodrigues)."""
    angle = float(np.linalg.norm(v))
    if angle < 1e-9:
        return np.eye(3)
    k = v / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * (kx @ kx)


class OSCController:
    """Turns 7-D delta-pose actions into arm torques and finger position targets for one MjModel.

    Args:
        model: the compiled scene; its first 7 dofs are the arm joints, actuators 0-6 their motors and
            actuators 7-8 the two finger position servos.
        site_id: the end-effector site (robosuite's ``grip_site``).
        home_qpos: (7,) joint configuration the null-space term pulls toward.
    """

    def __init__(self, model: mujoco.MjModel, site_id: int, home_qpos: np.ndarray, config: OSCConfig):
        self.m, self.site, self.cfg = model, site_id, config
        self.home = np.asarray(home_qpos, dtype=np.float64)
        self.kd = 2 * np.sqrt(config.kp) * config.damping_ratio
        self.kd_null = 2 * np.sqrt(config.kp_null)
        self.lo, self.hi = model.actuator_ctrlrange[:7, 0].copy(), model.actuator_ctrlrange[:7, 1].copy()
        self.finger_lo, self.finger_hi = model.actuator_ctrlrange[7:9, 0], model.actuator_ctrlrange[7:9, 1]
        self._jac = np.zeros((6, model.nv))
        self._minv_jt = np.zeros((6, model.nv))
        self._vec = np.zeros(model.nv)
        self._mvec = np.zeros(model.nv)
        self.goal_pos = np.zeros(3)
        self.goal_rot = np.eye(3)
        self.gripper = -1.0  # current (rate-limited) gripper command: -1 open, +1 closed
        self._gripper_target = -1.0

    def reset(self, data: mujoco.MjData) -> None:
        """Hold the current pose with the gripper open."""
        self.goal_pos = data.site_xpos[self.site].copy()
        self.goal_rot = data.site_xmat[self.site].reshape(3, 3).copy()
        self.gripper = self._gripper_target = -1.0

    def set_action(self, data: mujoco.MjData, action: np.ndarray) -> None:
        """(7,) action in [-1, 1] -> new goal pose relative to the current pose, new gripper target."""
        a = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        self.goal_pos = data.site_xpos[self.site] + a[:3] * self.cfg.pos_scale
        rot = data.site_xmat[self.site].reshape(3, 3)
        self.goal_rot = axis_angle_to_matrix(a[3:6] * self.cfg.rot_scale) @ rot
        self._gripper_target = float(np.sign(a[6])) if a[6] != 0 else self._gripper_target

    def apply(self, data: mujoco.MjData) -> None:
        """Write ``data.ctrl`` for the next simulation substep.

        Call between ``mj_step1`` and ``mj_step2`` (kinematics, inertia and its factorisation are then
        current). ``M^-1`` is applied with MuJoCo's sparse factorisation (``mj_solveM``) restricted to the
        arm's rows, and Lambda is never formed: its products are Cholesky solves, to keep a substep cheap.
        """
        m, cfg = self.m, self.cfg
        q, qd = data.qpos[:7], data.qvel[:7]
        jac = self._jac
        mujoco.mj_jacSite(m, data, jac[:3], jac[3:], self.site)
        mujoco.mj_solveM(m, data, self._minv_jt, jac)  # rows: M^-1 j_i, (6, nv)
        j = jac[:, :7]
        minv_jt = self._minv_jt[:, :7].T  # (7, 6)
        lam_inv = j @ minv_jt  # (6, 6) = J M^-1 J^T = Lambda^-1
        pos = data.site_xpos[self.site]
        rot = data.site_xmat[self.site].reshape(3, 3)
        vel = j @ qd
        f_pos = cfg.kp * (self.goal_pos - pos) - self.kd * vel[:3]
        f_rot = cfg.kp * orientation_error(self.goal_rot, rot) - self.kd * vel[3:]
        # decoupled wrench: Lambda_pos f_pos, Lambda_rot f_rot (Cholesky solves, no explicit inverses)
        wrench = np.concatenate([_spd_solve(lam_inv[:3, :3], f_pos), _spd_solve(lam_inv[3:, 3:], f_rot)])
        # null space: N^T tau0 = tau0 - J^T Jbar^T tau0, Jbar^T tau0 = Lambda J M^-1 tau0
        acc = cfg.kp_null * (self.home - q) - self.kd_null * qd
        self._vec[:] = 0.0
        self._vec[:7] = acc
        mujoco.mj_mulM(m, data, self._mvec, self._vec)
        tau0 = self._mvec[:7]
        tau = j.T @ (wrench - _spd_solve(lam_inv, minv_jt.T @ tau0)) + tau0 + data.qfrc_bias[:7]
        data.ctrl[:7] = np.clip(tau, self.lo, self.hi)
        # rate-limited gripper, mapped to the finger servos' ranges (+1 closes, -1 opens)
        step = cfg.gripper_speed
        self.gripper = float(np.clip(self.gripper + np.clip(self._gripper_target - self.gripper, -step, step),
                                     -1.0, 1.0))
        opening = (1.0 - self.gripper) / 2  # 1 open, 0 closed
        data.ctrl[7] = self.finger_lo[0] + opening * (self.finger_hi[0] - self.finger_lo[0])
        data.ctrl[8] = self.finger_hi[1] - opening * (self.finger_hi[1] - self.finger_lo[1])
