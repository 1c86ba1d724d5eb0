"""The built-in LIBERO-style suite with real MuJoCo: specs, predicates, observations, determinism, experts,
demos, suite evaluation and a tiny train/evaluate run through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from embodied_distill.sim.libero_style import spec as spec_mod
from embodied_distill.sim.libero_style.spec import (
    Predicate,
    SpecError,
    build_task_spec,
    list_suites,
    list_tasks,
    load_suite,
    load_task,
    parse_predicate,
)

pytestmark = pytest.mark.sim
REPO = Path(__file__).resolve().parents[2]


def _panda_available() -> str | None:
    from embodied_distill.sim.libero_style.assets import RobotAssetsNotFound, robosuite_assets_dir

    try:
        robosuite_assets_dir()
    except RobotAssetsNotFound as e:
        return str(e)
    return None


needs_panda = pytest.mark.skipif(_panda_available() is not None,
                                 reason=f"robosuite's Panda MJCF is not installed: {_panda_available()}")
ALL_TASKS = [(s, t) for s in list_suites() for t in list_tasks(s)]


# ------------------------------------------------------------------------------------- specs
def test_three_families_with_at_least_twelve_tasks_each_with_an_instruction():
    assert list_suites() == ["libero_goal", "libero_object", "libero_spatial"]
    assert len(ALL_TASKS) >= 12
    for suite in list_suites():
        tasks = load_suite(suite)
        assert len(tasks) >= 4, suite
        instructions = [t.instruction for t in tasks]
        assert len(set(instructions)) == len(instructions), f"{suite}: instructions must differ"
        for t in tasks:
            assert t.instruction[0].islower() and len(t.instruction.split()) >= 4, t.instruction
            assert t.goal and all(p.name in spec_mod.PREDICATES for p in t.goal)
            assert {o.name for o in t.objects} == {n for n, _ in t.init}
    # family shapes: spatial tasks share objects but not layouts; goal tasks share the whole scene
    spatial = load_suite("libero_spatial")
    assert len({tuple(o.name for o in t.objects) for t in spatial}) == 1
    assert len({t.regions for t in spatial}) == len(spatial)
    goal = load_suite("libero_goal")
    assert len({(t.objects, t.regions, t.init) for t in goal}) == 1
    assert len({t.goal for t in goal}) == len(goal)
    obj = load_suite("libero_object")
    assert len({t.goal[0].args[0] for t in obj}) == len(obj)  # a different target object per task


def test_every_task_has_a_hydra_config_that_matches_its_spec():
    root = REPO / "configs" / "task"
    for suite, task in ALL_TASKS:
        cfg = yaml.safe_load((root / suite / f"{task}.yaml").read_text())
        assert cfg["name"] == f"{suite}/{task}" and cfg["sim"] == "libero"
        assert (cfg["suite"], cfg["task"]) == (suite, task)
        assert cfg["max_episode_steps"] == load_task(suite, task).max_episode_steps
    for suite in list_suites():
        cfg = yaml.safe_load((root / f"{suite}.yaml").read_text())
        assert cfg["name"] == suite and cfg["task"] is None
        configs = sorted(p.stem for p in (root / suite).glob("*.yaml"))
        assert configs == list_tasks(suite), f"configs/task/{suite}/ and the specs disagree"


def test_predicate_parsing():
    assert parse_predicate("On(red_cube, plate)") == Predicate("On", ("red_cube", "plate"))
    assert parse_predicate({"Lifted": ["cube", 0.1]}) == Predicate("Lifted", ("cube", 0.1))
    assert str(parse_predicate(" In( a ,b ) ")) == "In(a, b)"
    for bad, msg in [("Under(a, b)", "unknown predicate"), ("On(a)", "takes 2"), ("On a b", "cannot parse"),
                     ({"On": ["a", "b"], "In": ["a", "b"]}, "exactly one")]:
        with pytest.raises(SpecError, match=msg):
            parse_predicate(bad)


SUITE = {"objects": {"cube": {"kind": "cube", "color": "red"}, "bowl": {"kind": "bowl"},
                     "plate": {"kind": "plate"}},
         "regions": {"a": {"center": [0, 0.1], "half_size": [0.02, 0.02]},
                     "b": {"center": [0.1, -0.1], "half_size": [0.02, 0.02]},
                     "c": {"center": [0.1, 0.1], "half_size": [0.02, 0.02]}},
         "init": {"cube": {"region": "a"}, "bowl": {"region": "b"}, "plate": {"region": "c"}}}
OK = {"instruction": "x y z w", "goal": ["On(cube, plate)"]}


@pytest.mark.parametrize("task,msg", [
    ({"goal": ["On(cube, plate)"]}, "instruction"),
    ({"instruction": "x y z w", "goal": []}, "goal"),
    ({"instruction": "x y z w", "goal": ["On(ball, plate)"]}, "'ball' is not an object"),
    ({"instruction": "x y z w", "goal": ["In(cube, plate)"]}, "needs a bowl or basket"),
    ({"instruction": "x y z w", "goal": ["On(cube, bowl)"]}, "use In"),
    ({"instruction": "x y z w", "goal": ["PushedTo(cube, nowhere)"]}, "not a region"),
    ({"instruction": "x y z w", "goal": ["Lifted(cube, -1)"]}, "height"),
    ({"instruction": "x y z w", "goal": ["On(bowl, plate)"]}, "not a bowl"),
    ({**OK, "objects": {"p": {"kind": "pyramid"}}}, "kind"),
    ({**OK, "objects": {"cube": {"kind": "cube", "color": "mauve"}}}, "unknown color"),
    ({**OK, "objects": {"cube": {"kind": "cube", "size": -1}}}, "must be > 0"),
    ({**OK, "init": {"cube": {"region": "zz"}}}, "unknown region"),
    ({**OK, "colour": "red"}, "unknown task field"),
])
def test_malformed_specs_are_rejected_with_a_clear_message(task, msg):
    with pytest.raises(SpecError, match=msg):
        build_task_spec(SUITE, task, "s", "t", "t.yaml")


def test_unknown_suite_and_task_list_the_valid_ones():
    with pytest.raises(KeyError, match="libero_goal"):
        list_tasks("libero_nope")
    with pytest.raises(KeyError, match="lift_green_cube"):
        load_task("libero_goal", "fly")


# ------------------------------------------------------------------------------------- simulation
@pytest.fixture(scope="module")
def goal_env():
    from embodied_distill.sim.libero_style.env import LiberoStyleEnv

    if _panda_available():
        pytest.skip(_panda_available())
    env = LiberoStyleEnv(load_task("libero_goal", "put_red_cube_in_bowl"))
    yield env
    env.close()


def _place(env, **poses):
    """Hand-place objects: ``name=(x, y, z)`` (upright, yaw 0); others keep their seed-0 poses."""
    from embodied_distill.sim.libero_style.env import sample_initial_state

    init = sample_initial_state(env.task, 0)
    names = [o.name for o in env.task.objects]
    for name, xyz in poses.items():
        init["objects"][names.index(name)] = [*xyz, 1, 0, 0, 0]
    env.set_initial_state(init)
    return env.scene


@needs_panda
def test_predicates_hold_on_hand_placed_states_and_each_has_a_negative_case(goal_env):
    from embodied_distill.sim.libero_style.predicates import holds

    on_plate, in_bowl = Predicate("On", ("green_cube", "plate")), Predicate("In", ("red_cube", "bowl"))
    stack, lifted = Predicate("On", ("red_cube", "green_cube")), Predicate("Lifted", ("green_cube", 0.1))
    pushed = Predicate("PushedTo", ("red_cube", "target_zone"))
    plate, bowl = (0.14, -0.14, 0.006), (0.16, 0.06, 0.0225)
    cases = [  # (placement, predicate, expected)
        ({"plate": plate, "green_cube": (0.14, -0.14, 0.0315)}, on_plate, True),
        ({"plate": plate, "green_cube": (0.0, -0.14, 0.0199)}, on_plate, False),      # beside it
        ({"plate": plate, "green_cube": (0.14, -0.14, 0.07)}, on_plate, False),       # hovering above
        ({"plate": plate, "green_cube": (0.23, -0.14, 0.0315)}, on_plate, False),     # centre past the rim
        ({"bowl": bowl, "red_cube": (0.16, 0.06, 0.0275)}, in_bowl, True),
        ({"bowl": bowl, "red_cube": (0.0, 0.06, 0.0199)}, in_bowl, False),            # on the table
        ({"bowl": bowl, "red_cube": (0.16, 0.06, 0.15)}, in_bowl, False),             # above the rim
        ({"green_cube": (0.0, -0.1, 0.0199), "red_cube": (0.0, -0.1, 0.0595)}, stack, True),
        ({"green_cube": (0.0, -0.1, 0.0199), "red_cube": (0.0, -0.03, 0.0199)}, stack, False),
        ({"green_cube": (0.0, -0.1, 0.15)}, lifted, True),
        ({"green_cube": (0.0, -0.1, 0.1)}, lifted, False),                            # bottom at 0.08
        ({"green_cube": (0.0, -0.1, 0.0199)}, lifted, False),
        ({"red_cube": (-0.15, 0.0, 0.0199)}, pushed, True),
        ({"red_cube": (-0.03, 0.15, 0.0199)}, pushed, False),                         # outside the zone
        ({"red_cube": (-0.15, 0.0, 0.1)}, pushed, False),                             # above it, not on it
    ]
    for placement, pred, expected in cases:
        scene = _place(goal_env, **placement)
        assert holds(pred, scene) is expected, (pred, placement)


@needs_panda
def test_observation_and_action_spaces_and_instructions():
    from embodied_distill.sim.libero_style.assets import CAMERAS
    from embodied_distill.sim.libero_style.env import ROBOT_STATE_DIM, LiberoStyleEnv, LiberoStyleEnvConfig

    task = load_task("libero_object", "put_orange_can_in_basket")
    env = LiberoStyleEnv(task, LiberoStyleEnvConfig(obs_mode="rgb"))
    try:
        obs, info = env.reset(seed=1)
        assert set(obs) == {"state", "rgb"} and env.observation_space.contains(obs)
        assert obs["state"].shape == (ROBOT_STATE_DIM + 7 * len(task.objects),) == (65,)
        assert obs["rgb"].shape == (len(CAMERAS), 128, 128, 3) and obs["rgb"].dtype == np.uint8
        assert all(obs["rgb"][i].std() > 5 for i in range(2)), "a camera image is blank"
        assert env.action_space.shape == (7,) and env.action_space.low.min() == -1
        layout = dict(env.state_layout())
        assert layout["orange_can_pos"] == slice(51, 54)
        assert sum(s.stop - s.start for s in layout.values()) == 65
        np.testing.assert_allclose(obs["state"][layout["ee_pos"]], env.scene.ee_pos(), atol=1e-6)
        assert env.instruction == "pick up the orange can and place it in the basket"
        obs, reward, terminated, truncated, info = env.step(np.zeros(7))
        assert reward == 0.0 and not terminated and not truncated and info["success"] is False
        frame = env.render()
        assert frame.shape == (256, 512, 3)
    finally:
        env.close()
    with pytest.raises(ValueError, match="obs_mode"):
        LiberoStyleEnvConfig(obs_mode="depth")
    with pytest.raises(ValueError, match="whole number"):
        LiberoStyleEnvConfig(sim_timestep=0.003)


@needs_panda
def test_reset_with_the_same_seed_is_deterministic(goal_env):
    actions = np.random.default_rng(0).uniform(-1, 1, (15, 7))

    def rollout(seed):
        obs, _ = goal_env.reset(seed=seed)
        states = [obs["state"]]
        for a in actions:
            states.append(goal_env.step(a)[0]["state"])
        return np.stack(states)

    a, b, c = rollout(5), rollout(5), rollout(6)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[0], c[0])


@needs_panda
@pytest.mark.parametrize("suite,task", ALL_TASKS, ids=[f"{s}/{t}" for s, t in ALL_TASKS])
def test_scripted_expert_succeeds_from_three_evaluation_initial_states(suite, task):
    from embodied_distill.sim.libero_style.demos import EVAL_SEED_START, run_expert_episode
    from embodied_distill.sim.libero_style.env import LiberoStyleEnv

    env = LiberoStyleEnv(load_task(suite, task))
    try:
        for seed in range(EVAL_SEED_START, EVAL_SEED_START + 3):
            ep = run_expert_episode(env, seed, tail_steps=0)
            assert ep["success"], f"{suite}/{task}: expert failed from evaluation state {seed}"
            assert ep["action"].shape == (len(ep["state"]), 7) and np.abs(ep["action"]).max() <= 1
    finally:
        env.close()


# ------------------------------------------------------------------------------------- runner
def _runner(task: str, **extra):
    from embodied_distill.sim.libero_style import LiberoStyleRunner

    suite, _, name = task.partition("/")
    cfg = {"name": task, "sim": "libero", "suite": suite, "task": name or None, "obs_mode": "state",
           "control_mode": "osc_pose", "expert": "scripted", **extra}
    return LiberoStyleRunner(cfg)


@needs_panda
def test_demos_store_instructions_and_never_use_evaluation_states(tmp_path):
    from embodied_distill.sim.libero_style import EVAL_SEED_START, NUM_EVAL_STATES

    from embodied_distill.data.episode_store import EpisodeStore

    runner = _runner("libero_goal/lift_green_cube")
    summary = runner.collect_demos(tmp_path / "d.zarr", 2, seed_start=3, num_workers=1)
    assert summary["stored"] == 2
    store = EpisodeStore(tmp_path / "d.zarr", mode="r")
    assert list(store.episode_meta("instruction")) == [runner.specs[0].instruction] * 2
    seeds = store.episode_meta("seed")
    assert list(seeds) == [3, 4] and seeds.max() < EVAL_SEED_START
    ep = store.get_episode(0)
    assert ep["state"].shape[1] == 51 and ep["action"].shape[1] == 7
    # the fixed evaluation initial states are other states than the demos'
    eval_states = runner.initial_states()
    assert len(eval_states) == NUM_EVAL_STATES
    demo_objects = ep["state"][0, 23:]
    assert all(not np.allclose(s["objects"].reshape(-1), demo_objects, atol=1e-3) for s in eval_states)
    with pytest.raises(ValueError, match="evaluation initial states"):
        runner.collect_demos(tmp_path / "e.zarr", 10, seed_start=EVAL_SEED_START - 5, num_workers=1)
    with pytest.raises(ValueError, match="generated with"):
        runner.collect_demos(tmp_path / "d.zarr", 3, num_workers=1, noise_std=0.1, noise_prob=0.1)


@needs_panda
def test_suite_demos_cycle_through_tasks_with_instructions_and_task_ids(tmp_path):
    from embodied_distill.data.episode_store import EpisodeStore

    runner = _runner("libero_goal")
    runner.collect_demos(tmp_path / "suite.zarr", 2, num_workers=1)
    store = EpisodeStore(tmp_path / "suite.zarr", mode="r")
    assert list(store.episode_meta("task")) == [0, 1]  # seed s runs task s % num_tasks
    assert list(store.episode_meta("instruction")) == runner.instructions()[:2]
    states = store.load(["state"])["state"]
    assert states.shape[1] == 51 + 6  # one-hot task id appended for a suite
    ends = store.episode_ends
    assert states[0, -6:].tolist() == [1, 0, 0, 0, 0, 0]
    assert states[ends[0], -6:].tolist() == [0, 1, 0, 0, 0, 0]


@needs_panda
def test_rgb_demo_frames_match_the_observation_space():
    from embodied_distill.sim.libero_style.demos import run_expert_episode
    from embodied_distill.sim.libero_style.env import LiberoStyleEnv, LiberoStyleEnvConfig

    env = LiberoStyleEnv(load_task("libero_goal", "lift_green_cube"), LiberoStyleEnvConfig(obs_mode="rgb"))
    try:
        ep = run_expert_episode(env, 0, tail_steps=0, record_rgb=True)
    finally:
        env.close()
    assert ep["success"] and ep["rgb"].shape == (len(ep["state"]), 2, 128, 128, 3)
    assert ep["rgb"].dtype == np.uint8


class ZeroPolicy:
    def reset(self):
        pass

    def select_action(self, obs):
        assert isinstance(obs["instruction"], list) and obs["state"].dtype == torch.float32
        return torch.zeros(obs["state"].shape[0], 7)


@needs_panda
def test_suite_evaluation_reports_per_task_and_mean_success():
    runner = _runner("libero_goal", max_episode_steps=3)
    assert runner.multi_task and len(runner.specs) == 6
    report = runner.evaluate(ZeroPolicy(), episodes=1, seed_start=100_000, num_envs=1)
    assert set(report["per_task"]) == {s.full_name for s in runner.specs}
    rates = [r["success_rate"] for r in report["per_task"].values()]
    assert report["success_rate"] == pytest.approx(np.mean(rates))
    assert report["episodes"] == 6 and {e["task"] for e in report["per_episode"]} == set(report["per_task"])
    assert "fixed evaluation set" in report["initial_states"]


@needs_panda
def test_vector_env_with_worker_processes_returns_batched_dict_observations():
    runner = _runner("libero_spatial/cube_left_of_plate")
    venv = runner.make_vec_env(num_envs=2)
    try:
        obs = venv.reset([100_000, 100_001])
        assert obs["state"].shape == (2, 51) and obs["instruction"] == [runner.specs[0].instruction] * 2
        assert not np.allclose(obs["state"][0], obs["state"][1])
        obs, reward, success = venv.step(np.zeros((2, 7)))
        assert reward.shape == (2,) and success.dtype == bool
        assert venv.render(1).shape == (256, 512, 3)
    finally:
        venv.close()


@needs_panda
def test_train_and_evaluate_one_task_through_the_cli(tmp_path):
    cmd = [sys.executable, "-m", "embodied_distill.train", "sim=libero", "task=libero_goal/lift_green_cube",
           "demos.n_episodes=4", "demos.num_workers=1", "distill.steps=50", "distill.log_every=25",
           "eval.episodes=2", "eval.num_envs=1", "eval.video_episodes=0", "task.max_episode_steps=80",
           f"demos.dir={tmp_path / 'demos'}", f"hydra.run.dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["task"] == "libero_goal/lift_green_cube" and report["episodes"] == 2
    assert min(report["seeds"]) > report["max_demo_seed"] and report["max_episode_steps"] == 80
    assert "success rate" in out.stdout
    stores = list((tmp_path / "demos").rglob("*.zarr"))
    assert len(stores) == 1
    from embodied_distill.data.episode_store import EpisodeStore

    store = EpisodeStore(stores[0], mode="r")
    assert set(store.episode_meta("instruction")) == {"pick up the green cube and hold it above the table"}


@needs_panda
@pytest.mark.slow
def test_train_on_a_whole_suite_reports_per_task_success(tmp_path):
    cmd = [sys.executable, "-m", "embodied_distill.train", "sim=libero", "task=libero_goal",
           "demos.n_episodes=6", "demos.num_workers=1", "distill.steps=50", "eval.episodes=1",
           "eval.num_envs=1", "eval.video_episodes=1", f"demos.dir={tmp_path / 'demos'}",
           f"hydra.run.dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["task"] == "libero_goal" and len(report["per_task"]) == 6 and report["episodes"] == 6
    rates = [r["success_rate"] for r in report["per_task"].values()]
    assert report["success_rate"] == pytest.approx(np.mean(rates))
    assert len(list((tmp_path / "run").glob("eval_*.mp4"))) == 6
