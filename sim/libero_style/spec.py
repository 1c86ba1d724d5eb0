"""Declarative task specs of the built-in LIBERO-style suite, parsed from YAML.

A suite is a folder ``tasks/<suite>/`` holding ``suite.yaml`` (what every task of the suite shares) and
one ``<task>.yaml`` per task. A task file may add or override objects, regions and initial placements
(merged by name over the suite's), and sets its English ``instruction`` and its ``goal``::

    # tasks/libero_goal/suite.yaml                 # tasks/libero_goal/put_red_cube_in_bowl.yaml
    suite: libero_goal                             instruction: put the red cube in the bowl
    max_episode_steps: 200                         goal: ["In(red_cube, bowl)"]
    objects:
      red_cube: {kind: cube, color: red}
      bowl: {kind: bowl, color: blue}
    regions:
      left: {center: [0.0, 0.18], half_size: [0.05, 0.05]}
    init:
      red_cube: {region: left, yaw: [-0.6, 0.6]}     # region: a name, or a list to draw from

Goal predicates (a conjunction; all must hold): ``On(a, b)``, ``In(a, container)``,
``Lifted(a[, height])`` and ``PushedTo(a, region)``; their geometry lives in ``predicates.py``.
Coordinates are metres in the world frame: the table top is the plane z = 0, the robot base sits at
x = -0.56 on the table's centre line, +x points away from the robot and +y to the robot's left.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
OBJECT_KINDS = ("cube", "can", "bowl", "plate", "basket")
PREDICATES = {"On": 2, "In": 2, "Lifted": (1, 2), "PushedTo": 2}
COLORS: dict[str, tuple[float, float, float, float]] = {
    "red": (0.85, 0.12, 0.1, 1.0), "green": (0.15, 0.7, 0.2, 1.0), "blue": (0.15, 0.3, 0.85, 1.0),
    "yellow": (0.95, 0.85, 0.1, 1.0), "orange": (0.95, 0.5, 0.1, 1.0), "purple": (0.55, 0.2, 0.7, 1.0),
    "white": (0.92, 0.92, 0.9, 1.0), "grey": (0.5, 0.5, 0.5, 1.0), "brown": (0.55, 0.35, 0.2, 1.0),
    "black": (0.12, 0.12, 0.12, 1.0),
}
# default geometry per kind (metres, kg); a spec may override any of these per object
KIND_DEFAULTS: dict[str, dict[str, float]] = {
    "cube": {"size": 0.02, "mass": 0.05},                       # size: half edge
    "can": {"radius": 0.022, "height": 0.08, "mass": 0.08},
    "bowl": {"radius": 0.07, "height": 0.045, "wall": 0.008, "mass": 0.3},
    "plate": {"radius": 0.08, "height": 0.012, "mass": 0.3},
    "basket": {"half_x": 0.09, "half_y": 0.09, "height": 0.07, "wall": 0.008, "mass": 1.0},
}


class SpecError(ValueError):
    """A task spec is malformed (the message names the file and the field)."""


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """One movable object (each has a free joint)."""

    name: str
    """Unique name, used by regions, init and goal predicates."""
    kind: str
    """One of ``OBJECT_KINDS``: cube, can, bowl, plate, basket."""
    rgba: tuple[float, float, float, float]
    """Colour (from ``color: <name>`` or an explicit ``rgba``)."""
    params: tuple[tuple[str, float], ...]
    """Geometry and mass (``KIND_DEFAULTS[kind]`` updated by the spec), as sorted (key, value) pairs."""

    def param(self, key: str) -> float:
        return dict(self.params)[key]

    @property
    def half_height(self) -> float:
        """Distance from the body origin (the centre of its bounding box) down to its bottom face."""
        return self.param("size") if self.kind == "cube" else self.param("height") / 2

    @property
    def footprint_radius(self) -> float:
        """Radius of a disc around the origin that covers the object seen from above (collision checks)."""
        if self.kind == "cube":
            return self.param("size") * math.sqrt(2)
        if self.kind == "basket":
            return math.hypot(self.param("half_x"), self.param("half_y"))
        return self.param("radius")


@dataclasses.dataclass(frozen=True)
class RegionSpec:
    """An axis-aligned rectangle on the table (initial placement area or push target)."""

    name: str
    center: tuple[float, float]
    """(x, y) of the rectangle's centre."""
    half_size: tuple[float, float]
    """(half extent along x, half extent along y), both > 0."""
    visible: bool = False
    """Draw it on the table (a flat patch without collision), e.g. for push targets."""
    rgba: tuple[float, float, float, float] = (0.95, 0.85, 0.1, 0.6)

    def contains(self, xy, margin: float = 0.0) -> bool:
        """Whether the point ``xy`` lies inside the rectangle shrunk by ``margin`` on each side."""
        return all(abs(float(xy[i]) - self.center[i]) <= self.half_size[i] - margin for i in range(2))


@dataclasses.dataclass(frozen=True)
class InitSpec:
    """Where an object starts: uniform in a region, yaw uniform in a range."""

    regions: tuple[str, ...]
    """One region, or several: each episode the object takes one of them that no object placed before it
    took (so objects listing the same regions get a random permutation of them, as in LIBERO-Object)."""
    yaw: tuple[float, float] = (0.0, 0.0)
    """(low, high) of the yaw about world z, radians."""


@dataclasses.dataclass(frozen=True)
class Predicate:
    """One goal predicate, e.g. ``On(red_cube, plate)``; ``args`` are object/region names or numbers."""

    name: str
    args: tuple[str | float, ...]

    def __str__(self) -> str:
        return f"{self.name}({', '.join(str(a) for a in self.args)})"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A fully resolved task: the suite's shared scene merged with the task file."""

    suite: str
    name: str
    instruction: str
    objects: tuple[ObjectSpec, ...]
    regions: tuple[RegionSpec, ...]
    init: tuple[tuple[str, InitSpec], ...]
    """(object name, placement) in sampling order (every object has one)."""
    goal: tuple[Predicate, ...]
    max_episode_steps: int
    robot_init_noise: float = 0.02
    """Std (radians) of Gaussian noise on the robot's initial joint angles."""
    source: str = ""
    """Path of the task file (for error messages)."""

    @property
    def full_name(self) -> str:
        return f"{self.suite}/{self.name}"

    def object(self, name: str) -> ObjectSpec:
        for o in self.objects:
            if o.name == name:
                return o
        raise KeyError(f"{self.full_name}: no object {name!r}; objects: {[o.name for o in self.objects]}")

    def region(self, name: str) -> RegionSpec:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(f"{self.full_name}: no region {name!r}; regions: {[r.name for r in self.regions]}")


# ----------------------------------------------------------------------------------------- parsing
_PRED_RE = re.compile(r"^\s*([A-Za-z]+)\s*\(([^()]*)\)\s*$")


def parse_predicate(text: str | Mapping[str, Any], where: str = "") -> Predicate:
    """``"On(a, b)"`` or ``{"On": ["a", "b"]}`` -> Predicate (names checked later against the scene)."""
    if isinstance(text, Mapping):
        if len(text) != 1:
            raise SpecError(f"{where}: a goal entry needs exactly one predicate, got {dict(text)}")
        name, args = next(iter(text.items()))
        args = list(args) if isinstance(args, list | tuple) else [args]
    else:
        m = _PRED_RE.match(str(text))
        if not m:
            raise SpecError(f"{where}: cannot parse goal predicate {text!r}; "
                            "write e.g. 'On(red_cube, plate)'")
        name, args = m.group(1), [a.strip() for a in m.group(2).split(",") if a.strip()]
    if name not in PREDICATES:
        raise SpecError(f"{where}: unknown predicate {name!r}; known: {sorted(PREDICATES)}")
    arity = PREDICATES[name]
    ok = len(args) in arity if isinstance(arity, tuple) else len(args) == arity
    if not ok:
        raise SpecError(f"{where}: {name} takes {arity} arguments, got {args}")
    parsed: list[str | float] = []
    for a in args:
        try:
            parsed.append(float(a))
        except (TypeError, ValueError):
            parsed.append(str(a))
    return Predicate(name, tuple(parsed))


def _rgba(entry: Mapping[str, Any], where: str, default: str = "grey") -> tuple[float, float, float, float]:
    if "rgba" in entry:
        rgba = tuple(float(v) for v in entry["rgba"])
        if len(rgba) != 4 or not all(0 <= v <= 1 for v in rgba):
            raise SpecError(f"{where}: rgba must be 4 numbers in [0, 1], got {entry['rgba']}")
        return rgba  # type: ignore[return-value]
    color = entry.get("color", default)
    if color not in COLORS:
        raise SpecError(f"{where}: unknown color {color!r}; known: {sorted(COLORS)}")
    return COLORS[color]


def _object(name: str, entry: Mapping[str, Any], where: str) -> ObjectSpec:
    kind = entry.get("kind")
    if kind not in OBJECT_KINDS:
        raise SpecError(f"{where}: object {name!r} has kind {kind!r}; known kinds: {list(OBJECT_KINDS)}")
    params = dict(KIND_DEFAULTS[kind])
    for key, value in entry.items():
        if key in ("kind", "color", "rgba"):
            continue
        if key not in params:
            raise SpecError(f"{where}: object {name!r} ({kind}) has no parameter {key!r}; "
                            f"parameters: {sorted(params)}")
        if not float(value) > 0:
            raise SpecError(f"{where}: object {name!r}: {key} must be > 0, got {value}")
        params[key] = float(value)
    return ObjectSpec(name, kind, _rgba(entry, where), tuple(sorted(params.items())))


def _region(name: str, entry: Mapping[str, Any], where: str) -> RegionSpec:
    try:
        center = tuple(float(v) for v in entry["center"])
        half = tuple(float(v) for v in entry["half_size"])
    except KeyError as e:
        raise SpecError(f"{where}: region {name!r} needs {e.args[0]!r}") from None
    if len(center) != 2 or len(half) != 2 or min(half) <= 0:
        raise SpecError(f"{where}: region {name!r} needs center [x, y] and half_size [hx > 0, hy > 0]")
    return RegionSpec(name, center, half, bool(entry.get("visible", False)),  # type: ignore[arg-type]
                      _rgba(entry, where, "yellow") if ("rgba" in entry or "color" in entry)
                      else RegionSpec.rgba)


def _init(name: str, entry: Mapping[str, Any], where: str) -> InitSpec:
    if "region" not in entry:
        raise SpecError(f"{where}: init of {name!r} needs a region (a name or a list of names)")
    regions = entry["region"]
    regions = tuple(str(r) for r in regions) if isinstance(regions, list | tuple) else (str(regions),)
    if not regions:
        raise SpecError(f"{where}: init of {name!r} has an empty region list")
    yaw = entry.get("yaw", [0.0, 0.0])
    yaw = (float(yaw), float(yaw)) if isinstance(yaw, int | float) else tuple(float(v) for v in yaw)
    if len(yaw) != 2 or yaw[0] > yaw[1]:
        raise SpecError(f"{where}: init of {name!r}: yaw must be a number or [low, high], got {entry['yaw']}")
    return InitSpec(regions, yaw)  # type: ignore[arg-type]


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping at top level")
    return data


_TASK_KEYS = {"name", "instruction", "goal", "objects", "regions", "init", "max_episode_steps",
              "robot_init_noise"}
_SUITE_KEYS = {"suite", "description", "objects", "regions", "init", "max_episode_steps", "robot_init_noise"}


def build_task_spec(suite_data: Mapping[str, Any], task_data: Mapping[str, Any], suite: str, name: str,
                    source: str = "<memory>") -> TaskSpec:
    """Merge a suite mapping and a task mapping into a validated ``TaskSpec``."""
    for data, keys, what in ((suite_data, _SUITE_KEYS, "suite"), (task_data, _TASK_KEYS, "task")):
        unknown = sorted(set(data) - keys)
        if unknown:
            raise SpecError(f"{source}: unknown {what} field(s) {unknown}; valid: {sorted(keys)}")
    merged: dict[str, dict[str, Any]] = {}
    for key in ("objects", "regions", "init"):
        merged[key] = {**dict(suite_data.get(key) or {}), **dict(task_data.get(key) or {})}
    if not task_data.get("instruction"):
        raise SpecError(f"{source}: a task needs an English 'instruction'")
    if not task_data.get("goal"):
        raise SpecError(f"{source}: a task needs a non-empty 'goal' list of predicates")
    objects = tuple(_object(n, e, source) for n, e in merged["objects"].items())
    regions = tuple(_region(n, e, source) for n, e in merged["regions"].items())
    init = tuple((n, _init(n, e, source)) for n, e in merged["init"].items())
    goal = tuple(parse_predicate(g, source) for g in task_data["goal"])
    obj_names, region_names = {o.name for o in objects}, {r.name for r in regions}
    if not objects:
        raise SpecError(f"{source}: no objects")
    if obj_names & region_names:
        both = sorted(obj_names & region_names)
        raise SpecError(f"{source}: names used for both objects and regions: {both}")
    init_names = [n for n, _ in init]
    missing = sorted(obj_names - set(init_names))
    if missing or set(init_names) - obj_names:
        raise SpecError(f"{source}: init must place every object exactly once "
                        f"(missing {missing}, unknown {sorted(set(init_names) - obj_names)})")
    for n, i in init:
        for r in i.regions:
            if r not in region_names:
                raise SpecError(f"{source}: init of {n!r} uses unknown region {r!r}")
    kinds = {o.name: o.kind for o in objects}
    for p in goal:
        a = p.args[0]
        if a not in obj_names:
            raise SpecError(f"{source}: {p}: {a!r} is not an object")
        if p.name in ("On", "In"):
            b = p.args[1]
            if b not in obj_names or b == a:
                raise SpecError(f"{source}: {p}: {b!r} must be another object")
            if p.name == "In" and kinds[b] not in ("bowl", "basket"):
                raise SpecError(f"{source}: {p}: {b!r} is a {kinds[b]}, In() needs a bowl or basket")
            if p.name == "On" and kinds[b] in ("bowl", "basket"):
                raise SpecError(f"{source}: {p}: use In() for containers")
        if p.name == "Lifted" and len(p.args) == 2 and not (isinstance(p.args[1], float) and p.args[1] > 0):
            raise SpecError(f"{source}: {p}: the height must be a number > 0")
        if p.name == "PushedTo" and p.args[1] not in region_names:
            raise SpecError(f"{source}: {p}: {p.args[1]!r} is not a region")
        if p.name in ("On", "In", "Lifted", "PushedTo") and kinds[a] in ("bowl", "basket", "plate"):
            raise SpecError(f"{source}: {p}: the scripted experts move cubes and cans, not a {kinds[a]}")
    steps = int(task_data.get("max_episode_steps", suite_data.get("max_episode_steps", 200)))
    noise = float(task_data.get("robot_init_noise", suite_data.get("robot_init_noise", 0.02)))
    if steps < 1 or noise < 0:
        raise SpecError(f"{source}: max_episode_steps must be >= 1 and robot_init_noise >= 0")
    return TaskSpec(suite=suite, name=name, instruction=str(task_data["instruction"]).strip(),
                    objects=objects, regions=regions, init=init, goal=goal, max_episode_steps=steps,
                    robot_init_noise=noise, source=source)


def list_suites(tasks_dir: Path = TASKS_DIR) -> list[str]:
    """Names of the suites shipped in ``tasks_dir`` (folders with a suite.yaml)."""
    return sorted(p.parent.name for p in tasks_dir.glob("*/suite.yaml"))


def list_tasks(suite: str, tasks_dir: Path = TASKS_DIR) -> list[str]:
    """Task names of a suite, sorted (the order used for suite evaluation and task ids)."""
    folder = tasks_dir / suite
    if not (folder / "suite.yaml").exists():
        raise KeyError(f"unknown suite {suite!r}; suites: {list_suites(tasks_dir)}")
    return sorted(p.stem for p in folder.glob("*.yaml") if p.name != "suite.yaml")


def load_task(suite: str, task: str, tasks_dir: Path = TASKS_DIR) -> TaskSpec:
    """Load and validate ``tasks/<suite>/<task>.yaml`` merged with ``tasks/<suite>/suite.yaml``."""
    names = list_tasks(suite, tasks_dir)
    if task not in names:
        raise KeyError(f"suite {suite!r} has no task {task!r}; tasks: {names}")
    suite_path, task_path = tasks_dir / suite / "suite.yaml", tasks_dir / suite / f"{task}.yaml"
    suite_data, task_data = _load_yaml(suite_path), _load_yaml(task_path)
    if suite_data.get("suite", suite) != suite:
        raise SpecError(f"{suite_path}: 'suite: {suite_data['suite']}' does not match its folder {suite!r}")
    if task_data.get("name", task) != task:
        raise SpecError(f"{task_path}: 'name: {task_data['name']}' does not match its file name {task!r}")
    return build_task_spec(suite_data, task_data, suite, task, str(task_path))


def load_suite(suite: str, tasks_dir: Path = TASKS_DIR) -> list[TaskSpec]:
    """All tasks of a suite, in ``list_tasks`` order."""
    return [load_task(suite, t, tasks_dir) for t in list_tasks(suite, tasks_dir)]
