"""Built-in LIBERO-style task suite on MuJoCo (``sim=libero``), installed as
``embodied_distill.sim.libero_style``.

A Panda arm with its parallel gripper (robosuite's packaged MJCF, not copied here), a table and
primitive objects (cubes, a can, bowls, a plate, a basket); 16 tasks in three LIBERO-shaped suites,
each a declarative YAML spec under ``tasks/<suite>/`` with an English instruction and goal predicates
(``On``, ``In``, ``Lifted``, ``PushedTo``); LIBERO's 7-D delta end-effector action at 20 Hz through an
operational-space controller; state and optional RGB observations; scripted experts for every task.

Map: ``spec.py`` (YAML -> TaskSpec), ``assets.py`` (MJCF), ``controller.py`` (OSC), ``env.py`` (gymnasium
env), ``predicates.py`` (success), ``experts.py`` (scripted experts), ``demos.py`` (demo collection),
``runner.py`` (runner contract: demos, vector envs, evaluation). A new task is one YAML file in a suite
folder plus ``configs/task/<suite>/<task>.yaml``.
"""

from embodied_distill.sim.libero_style.demos import EVAL_SEED_START, NUM_EVAL_STATES
from embodied_distill.sim.libero_style.runner import LiberoStyleRunner, LiberoStyleVecEnv
from embodied_distill.sim.libero_style.spec import TaskSpec, list_suites, list_tasks, load_suite, load_task

__all__ = ["EVAL_SEED_START", "NUM_EVAL_STATES", "LiberoStyleRunner", "LiberoStyleVecEnv", "TaskSpec",
           "list_suites", "list_tasks", "load_suite", "load_task"]
