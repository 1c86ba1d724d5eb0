"""COMPASS: the embodiment interface pads and masks, the generalist runs for every embodiment, and
distillation on fixed data lowers the KL to each (real residual) specialist; plus real-sim pieces."""

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from embodied_distill.policies.base import build_policy, load_policy
from embodied_distill.policies.compass.modeling_compass import (
    CompassPolicy,
    CompassPolicyConfig,
    feature_mask,
    pad_features,
)
from embodied_distill.policies.rl.configuration_rl import ResidualPolicyConfig
from embodied_distill.policies.rl.modeling_rl import ResidualPolicy
from omegaconf import OmegaConf

from embodied_distill.data.normalizer import Normalizer
from embodied_distill.distill.compass import (
    BalancedData,
    CompassConfig,
    Embodiment,
    demo_path,
    fit_generalist,
    generalist_loss,
    perturbed_rows,
    specialist_gaussian,
)

# real sizes: panda pd_ee_delta_pose (42 state / 7 action), so100 pd_joint_pos (36 / 6), fetch (54 / 12)
ROBOTS = {"panda": (42, 7), "so100": (36, 6), "fetch": (54, 12)}


def _normalizer(robots=ROBOTS, seed=0) -> Normalizer:
    rng = np.random.default_rng(seed)
    data = {}
    for name, (ds, da) in robots.items():
        data[f"state/{name}"] = rng.normal(rng.normal(0, 1, ds), rng.uniform(0.1, 2, ds), (200, ds))
        data[f"action/{name}"] = rng.uniform(-1, 1, (200, da)) * rng.uniform(0.2, 3, da)
    return Normalizer.fit(data)


def _policy(robots=ROBOTS, seed=0, **kw) -> CompassPolicy:
    torch.manual_seed(seed)
    emb = [{"name": n, "obs_dim": ds, "action_dim": da} for n, (ds, da) in robots.items()]
    return CompassPolicy(
        CompassPolicyConfig(embodiments=emb, hidden_dims=(64, 64), **kw), _normalizer(robots)
    )


def test_pad_features_and_feature_mask():
    x = torch.arange(6.0).reshape(2, 3)
    p = pad_features(x, 5)
    assert p.shape == (2, 5) and torch.equal(p[:, :3], x) and torch.equal(p[:, 3:], torch.zeros(2, 2))
    assert pad_features(x, 3) is x
    with pytest.raises(ValueError, match="cannot pad 3 features into a width of 2"):
        pad_features(x, 2)
    m = feature_mask(torch.tensor([1, 3, 4]), 4)
    assert m.tolist() == [[True, False, False, False], [True, True, True, False], [True, True, True, True]]
    with pytest.raises(ValueError):
        feature_mask(torch.tensor([5]), 4)


def test_interface_pads_per_embodiment_and_masks_absent_dims():
    pol = _policy()
    c = pol.config
    assert (c.max_obs_dim, c.max_action_dim, c.max_embodiments) == (54, 12, 3)
    for name, (ds, da) in ROBOTS.items():
        s = torch.randn(5, ds)
        padded = pol.normalize_state(name, s)
        assert padded.shape == (5, 54) and torch.equal(padded[:, ds:], torch.zeros(5, 54 - ds))
        p = pol.normalizer.params[f"state/{name}"]  # the robot's own statistics, computed by hand
        torch.testing.assert_close(padded[:, :ds], (s - p["offset"]) * p["scale"])
        idx = torch.full((5,), c.index(name))
        mean, log_std = pol.distribution(padded, idx)
        assert mean.shape == (5, 12) and log_std.shape == (12,)
        assert torch.equal(mean[:, da:], torch.zeros(5, 12 - da))  # absent action dims are exactly 0
        # features past the robot's own state are masked: garbage there changes nothing
        dirty = padded.clone()
        dirty[:, ds:] = 100.0
        torch.testing.assert_close(pol.distribution(dirty, idx)[0], mean)
    # the same state read as two robots gives different actions (the embodiment code matters)
    s = torch.randn(4, 54)
    a0 = pol.distribution(s, torch.zeros(4, dtype=torch.long))[0]
    a2 = pol.distribution(s, torch.full((4,), 2))[0]
    assert not torch.allclose(a0[:, :7], a2[:, :7])


@pytest.mark.parametrize("embedding", ["onehot", "learned"])
def test_generalist_forward_for_every_embodiment(embedding):
    pol = _policy(embedding=embedding).eval()
    for name, (ds, da) in ROBOTS.items():
        view = pol.as_embodiment(name)
        assert view.config.obs_dim == ds and view.config.action_dim == da
        chunk = view.predict_action_chunk({"state": torch.randn(3, 1, ds)})
        assert chunk.shape == (3, 1, da) and torch.isfinite(chunk).all()
        view.reset()
        act = view.select_action({"state": torch.randn(3, ds)})
        assert act.shape == (3, da)
        mean, std = view.action_distribution({"state": torch.randn(3, 1, ds)})
        scale = view.normalizer.params[f"action/{name}"]["scale"]
        torch.testing.assert_close(std[0], 0.1 / scale)  # global std 0.1 in normalised units
        assert mean.shape == (3, da)
        with pytest.raises(ValueError, match=f"{name} states have {ds} features"):
            view.predict_action_chunk({"state": torch.randn(3, 1, ds + 1)})


def test_new_robot_joins_by_config_and_checkpoints_round_trip(tmp_path):
    """Reserved widths: adding a robot keeps every layer's shape, so a trained network is reused."""
    reserve = {"max_obs_dim": 64, "max_action_dim": 12, "max_embodiments": 4}
    two = {k: ROBOTS[k] for k in ("panda", "so100")}
    old, new = _policy(two, **reserve), _policy(ROBOTS, **reserve)
    assert {k: v.shape for k, v in old.state_dict().items()} == {
        k: v.shape for k, v in new.state_dict().items()
    }
    new.load_state_dict(old.state_dict())
    s = torch.randn(2, 1, 42)
    torch.testing.assert_close(
        new.as_embodiment("panda").predict_action_chunk({"state": s}),
        old.as_embodiment("panda").predict_action_chunk({"state": s}),
    )
    # through the policy registry and a checkpoint directory, acting as its configured robot
    view = new.as_embodiment("fetch")
    view.save_pretrained(tmp_path / "ckpt")
    back = load_policy(tmp_path / "ckpt")[0]
    s = torch.randn(2, 1, 54)
    assert back.config.embodiment == "fetch"
    torch.testing.assert_close(
        back.predict_action_chunk({"state": s}), view.predict_action_chunk({"state": s})
    )
    with pytest.raises(ValueError, match="exceed"):
        _policy(ROBOTS, max_obs_dim=40)
    with pytest.raises(ValueError, match="max_embodiments"):
        _policy(ROBOTS, max_embodiments=2)
    with pytest.raises(ValueError, match="not one of"):
        _policy(ROBOTS, embodiment="xarm6")


def test_config_rejects_bad_input():
    with pytest.raises(ValueError, match="expert"):
        Embodiment(name="a", robot_uids="panda", expert="human")
    with pytest.raises(ValueError, match="unique"):
        CompassConfig(embodiments=[{"name": "a", "robot_uids": "panda"}] * 2)
    with pytest.raises(ValueError, match="unknown stage"):
        CompassConfig(embodiments=[{"name": "a", "robot_uids": "panda"}], stages=["rl"])
    with pytest.raises(ValueError, match="unknown field"):
        CompassConfig.from_cfg({"embodiments": [{"name": "a", "robot_uids": "panda"}], "epoch": 3})
    with pytest.raises(ValueError, match="total_steps"):
        CompassConfig(embodiments=[{"name": "a", "robot_uids": "panda"}], specialist={"total_steps": 0})
    with pytest.raises(ValueError, match="demos must be >= 1"):
        Embodiment(name="a", robot_uids="panda", demos=0)
    with pytest.raises(ValueError, match="demo_noise"):
        Embodiment(name="a", robot_uids="panda", demo_noise_prob=1.5)
    with pytest.raises(ValueError, match="residual_scale"):
        Embodiment(name="a", robot_uids="so100", residual_scale=0.0)


def test_demo_settings_per_embodiment_fall_back_to_the_demos_group():
    demos = OmegaConf.create({"noise_std": 0.3, "noise_prob": 0.3})
    assert Embodiment(name="a", robot_uids="panda").demo_noise(demos) == (0.3, 0.3)
    own = Embodiment(name="b", robot_uids="so100", control_mode="pd_joint_pos", expert="motionplanner",
                     demo_noise_std=0.05, demo_noise_prob=0.5)
    assert own.demo_noise(demos) == (0.05, 0.5)
    planner = Embodiment(name="c", robot_uids="so100", control_mode="pd_joint_pos", expert="motionplanner")
    assert planner.demo_noise(demos) == (0.0, 0.0)  # demos.noise_* is in scripted-expert units
    assert planner.demo_count(100) == 100
    assert Embodiment(name="d", robot_uids="panda", demos=15).demo_count(100) == 15
    cfg = OmegaConf.create({"task": {"name": "pickcube"}, "demos": {"dir": "/d", **demos}})
    assert demo_path(cfg, own).name == "pickcube_so100_pd_joint_pos_motionplanner_noise0.05x0.5.zarr"


def _kl_by_hand(mt, st, ms, ss):
    """KL(N(mt, st^2) || N(ms, ss^2)) summed over the last axis, from the textbook formula."""
    return np.sum(np.log(ss / st) + (st**2 + (mt - ms) ** 2) / (2 * ss**2) - 0.5, axis=-1)


def test_generalist_loss_ignores_masked_dims_and_matches_the_closed_form():
    torch.manual_seed(0)
    b, d = 6, 5
    dims = torch.tensor([2, 5, 3, 3, 1, 4])
    mask = feature_mask(dims, d)
    mu_s, mu_t = torch.randn(b, d), torch.randn(b, d)
    log_std_s, log_std_t = torch.randn(d) * 0.3, torch.randn(b, d) * 0.3
    loss = generalist_loss("kl", mu_s, log_std_s, mu_t, log_std_t, mask)
    per_row = [
        _kl_by_hand(
            mu_t[i, :k].numpy(),
            log_std_t[i, :k].exp().numpy(),
            mu_s[i, :k].numpy(),
            log_std_s[:k].exp().numpy(),
        )
        for i, k in enumerate(dims.tolist())
    ]
    assert float(loss) == pytest.approx(float(np.mean(per_row)), rel=1e-5)
    junk = mu_s.clone()
    junk[~mask] = 1e3  # anything on absent dims is ignored
    assert float(generalist_loss("kl", junk, log_std_s, mu_t, log_std_t, mask)) == pytest.approx(float(loss))
    mse = generalist_loss("mse", mu_s, log_std_s, mu_t, log_std_t, mask)
    assert float(mse) == pytest.approx(float(((mu_s - mu_t) ** 2)[mask].mean()), rel=1e-6)
    with pytest.raises(ValueError, match="kl or mse"):
        generalist_loss("jsd", mu_s, log_std_s, mu_t, log_std_t, mask)


def _specialist(base: CompassPolicy, name: str, seed: int) -> ResidualPolicy:
    """A real residual specialist on ``base`` acting as ``name``, its residual head perturbed (a trained
    residual is not zero)."""
    view = base.as_embodiment(name).eval()
    ds, da = view.config.obs_dim, view.config.action_dim
    cfg = ResidualPolicyConfig(
        obs_dim=ds,
        action_dim=da,
        extra_dim=da,
        hidden_dims=(32,),
        action_low=-3.0,
        action_high=3.0,
        base_policy=view.policy_config_dict(),
        residual_scale=0.5,
    )
    spec = ResidualPolicy(cfg, view.normalizer)
    spec.base.load_state_dict(view.state_dict())
    torch.manual_seed(seed)
    with torch.no_grad():
        spec.actor_critic.actor[-1].weight.normal_(0, 0.5)
        spec.actor_critic.log_std.fill_(-1.5)
    return spec.eval()


def _specialist_data(base: CompassPolicy, robots: dict, log_std: dict[str, float] | None = None) -> dict:
    """Fixed distillation data: 400 states per robot (uniform in its normalised range) with the Gaussian
    of a real residual specialist on ``base`` (its log std set per robot from ``log_std`` if given)."""
    rng = np.random.default_rng(0)
    data = {}
    for i, (name, (ds, _)) in enumerate(robots.items()):
        spec = _specialist(base, name, seed=10 + i)
        if log_std is not None:
            with torch.no_grad():
                spec.actor_critic.log_std.fill_(log_std[name])
        p = base.normalizer.params[f"state/{name}"]
        states = torch.as_tensor(rng.uniform(-1, 1, (400, ds)), dtype=torch.float32)
        states = states / p["scale"] + p["offset"]
        mean, std = specialist_gaussian(spec, states)
        data[name] = {"state": states.numpy(), "mean": mean.numpy(), "std": std.numpy()}
    return data


def _kl_per_robot(pol: CompassPolicy, ccfg: CompassConfig, data: dict) -> dict[int, float]:
    """KL(specialist || pol) on each robot's share of ``data``, keyed by embodiment index."""
    from embodied_distill.distill.compass import distill_data

    out = {}
    for e, part in enumerate(distill_data(pol, ccfg, data).parts):
        with torch.no_grad():
            mean, log_std = pol.distribution(part["state"], part["embodiment"])
            mask = pol.action_mask(part["embodiment"])
            out[e] = float(generalist_loss("kl", mean, log_std, part["teacher_mean"], part["teacher_log_std"],
                                           mask))
    return out


def test_distillation_on_fixed_data_lowers_the_kl_to_each_specialist(tmp_path):
    robots = {k: ROBOTS[k] for k in ("panda", "so100")}
    base = _policy(robots, seed=0).eval()
    data = _specialist_data(base, robots)
    ccfg = CompassConfig(
        embodiments=[{"name": n, "robot_uids": n} for n in robots],
        epochs=40,
        optim={
            "lr": 1e-3,
            "weight_decay": 0.0,
            "warmup_steps": 10,
            "batch_size": 64,
            "grad_clip": 1.0,
            "log_every": 50,
            "checkpoint_every": 100,
        },
    )
    cfg = OmegaConf.create({"seed": 0, "resume": True})
    torch.manual_seed(1)
    before = type(base)(base.config, base.normalizer).eval()  # a fresh network, as fit_generalist starts from
    start = _kl_per_robot(before, ccfg, data)
    student = fit_generalist(cfg, ccfg, base, None, data, tmp_path / "gen", torch.device("cpu"))
    end = _kl_per_robot(student.eval(), ccfg, data)
    print("KL to each specialist before / after:", start, end)
    for e in start:
        assert end[e] < 0.2 * start[e], (start, end)
    assert (tmp_path / "gen" / "checkpoint" / "meta.json").exists()
    # the std is learned: it moves from 0.1 toward the specialists' (normalised) std
    assert not torch.allclose(student.log_std, torch.full_like(student.log_std, math.log(0.1)))


def test_perturbed_rows_are_noisy_copies_labelled_by_the_specialist():
    """``state_noise_copies``: each recorded state is repeated, moved by Gaussian noise whose std per
    feature is ``noise`` x that feature's normalisation spread, and labelled by the specialist at the new
    state (not the recorded label)."""
    robots = {"so100": ROBOTS["so100"]}
    base = _policy(robots, seed=0).eval()
    spec = _specialist(base, "so100", seed=3)
    rows = _specialist_data(base, robots)["so100"]  # 400 states
    out = perturbed_rows(spec, base, "so100", rows, copies=3, noise=0.2, rng=np.random.default_rng(0))
    assert {k: v.shape for k, v in out.items()} == {"state": (1200, 36), "mean": (1200, 6), "std": (1200, 6)}
    delta = out["state"] - np.repeat(rows["state"], 3, axis=0)  # copy j of row i sits at 3 * i + j
    spread = 1.0 / base.normalizer.params["state/so100"]["scale"].numpy()
    ratio = delta.std(0) / (0.2 * spread)  # 1200 draws per feature: within ~10% of 1
    assert np.all(np.abs(ratio - 1) < 0.15), ratio
    assert np.all(np.abs(delta.mean(0)) < 0.1 * 0.2 * spread)
    mean, std = specialist_gaussian(spec, torch.from_numpy(out["state"]))
    np.testing.assert_allclose(out["mean"], mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["std"], std.numpy(), rtol=1e-5, atol=1e-6)
    # the labels follow the moved states: they differ from the recorded labels of the unmoved ones
    assert np.abs(out["mean"] - np.repeat(rows["mean"], 3, axis=0)).max() > 1e-3
    with pytest.raises(ValueError, match="state_noise"):
        CompassConfig(embodiments=[{"name": "so100", "robot_uids": "so100"}], state_noise=0.0)


def test_std_per_embodiment_fits_robots_that_explore_at_different_scales(tmp_path):
    """Two specialists whose normalised stds differ ~50x: one shared std lands between them and the KL
    to the narrow robot stays high; one std row per robot learns each robot's own std and fits both."""
    robots = {k: ROBOTS[k] for k in ("panda", "so100")}
    base = _policy(robots, seed=0).eval()
    data = _specialist_data(base, robots, log_std={"panda": -4.0, "so100": 0.0})
    scales = {name: base.normalizer.params[f"action/{name}"]["scale"] for name in robots}
    teacher_log_std = {name: float((torch.as_tensor(d["std"][0]) * scales[name]).log().mean())
                       for name, d in data.items()}  # normalised units, as distilled
    optim = {"lr": 1e-2, "weight_decay": 0.0, "warmup_steps": 10, "batch_size": 64, "grad_clip": 1.0,
             "log_every": 50, "checkpoint_every": 1000}
    cfg = OmegaConf.create({"seed": 0, "resume": False})
    kl, fitted = {}, {}
    for per_robot in (False, True):
        ccfg = CompassConfig(embodiments=[{"name": n, "robot_uids": n} for n in robots], epochs=60,
                             optim=optim, policy={"std_per_embodiment": per_robot})
        pol = fit_generalist(cfg, ccfg, base, None, data, tmp_path / f"gen{per_robot}", torch.device("cpu"))
        fitted[per_robot], kl[per_robot] = pol, _kl_per_robot(pol, ccfg, data)
    print("KL per robot, global / per-robot std:", kl, "teacher log std:", teacher_log_std,
          "rows:", fitted[True].log_std.detach(), "global:", fitted[False].log_std.detach())
    assert fitted[False].log_std.shape == (7,) and fitted[True].log_std.shape == (2, 7)
    # each row moves toward its own robot's teacher std (init log 0.1 = -2.3; the teachers sit at about
    # -5.1 and -1.1): the narrow robot's row ends well below the wide one's, and the wide one's arrives
    rows = fitted[True].log_std.detach()
    narrow, wide = float(rows[0, :7].mean()), float(rows[1, :6].mean())
    assert narrow < wide - 1.0, rows
    assert abs(wide - teacher_log_std["so100"]) < 0.5, (rows, teacher_log_std)
    # the shared std sits near the wide robot's, so the narrow robot's KL stays much higher with it
    assert kl[True][0] < 0.7 * kl[False][0], kl
    assert sum(kl[True].values()) < sum(kl[False].values()), kl


def test_balanced_data_gives_every_embodiment_an_equal_share():
    parts = [
        {"embodiment": torch.zeros(10, dtype=torch.long), "state": torch.arange(10.0)[:, None]},
        {"embodiment": torch.ones(3, dtype=torch.long), "state": 100 + torch.arange(3.0)[:, None]},
    ]
    data = BalancedData(parts)
    assert len(data) == 20
    batch = data.get_batch(torch.arange(20))
    assert int((batch["embodiment"] == 1).sum()) == 10
    assert set(batch["state"][batch["embodiment"] == 1, 0].tolist()) == {100.0, 101.0, 102.0}


def test_registry_builds_compass_from_a_plain_dict():
    pol = _policy()
    again = build_policy("compass", pol.policy_config_dict(), pol.normalizer)
    assert again.config == pol.config


@pytest.mark.sim
def test_so100_motion_planner_demos_and_panda_interface_on_real_envs(tmp_path):
    """ManiSkill's so100 PickCube planner through the runner, with the real state/action sizes."""
    from embodied_distill.sim.maniskill import ManiSkillRunner

    from embodied_distill.data.episode_store import EpisodeStore

    task = {
        "name": "pickcube",
        "sim": "maniskill",
        "env_id": "PickCube-v1",
        "obs_mode": "state",
        "control_mode": "pd_joint_pos",
        "max_episode_steps": 120,
        "robot_uids": "so100",
        "expert": "motionplanner",
    }
    summary = ManiSkillRunner(task, sim_backend="cpu").collect_demos(
        tmp_path / "so100.zarr", 2, num_workers=1
    )
    store = EpisodeStore(tmp_path / "so100.zarr", mode="r")
    assert store.n_episodes == 2 and summary["successes"] >= 2
    d = store.load(["state", "action"])
    assert d["state"].shape[1] == 36 and d["action"].shape[1] == 6
    assert np.all(np.diff(np.concatenate([[0], store.episode_ends])) <= 120)


def _cli(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "embodied_distill.train", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )


@pytest.mark.sim
@pytest.mark.slow
def test_cli_compass_tiny_budget_runs_all_stages(tmp_path):
    run = tmp_path / "run"
    args = [
        "task=pickcube",
        "distill=compass",
        f"hydra.run.dir={run}",
        f"demos.dir={tmp_path / 'demos'}",
        "distill.demos_per_embodiment=2",
        "distill.base_steps=20",
        "distill.specialist.total_steps=250",
        "distill.specialist.n_steps=250",
        "distill.specialist.batch_size=125",
        "distill.specialist.eval_every=250",
        "distill.specialist.eval_episodes=1",
        "distill.data_episodes=1",
        "distill.dagger_rounds=1",
        "distill.dagger_episodes=1",
        "distill.epochs=2",
        "eval.episodes=2",
        "eval.num_envs=1",
        "demos.num_workers=1",
        "device=cpu",
        "torch_threads=1",
    ]
    out = _cli(tmp_path, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert set(report["per_embodiment"]) == {"panda", "so100"}
    for row in report["per_embodiment"].values():
        assert set(row) == {"base", "specialist", "generalist"} and row["generalist"]["episodes"] == 2
    assert (run / "generalist" / "data_round1.npz").exists()
    gen = load_policy(run / "generalist" / "checkpoint")[0]
    assert gen.config.names == ["panda", "so100"]
    # so100 sets its own residual scale (joint targets in radians); panda keeps the specialist group's
    scales = {r: load_policy(run / "specialists" / r / "checkpoint")[0].config.residual_scale
              for r in ("panda", "so100")}
    assert scales == {"panda": 0.25, "so100": 0.05}
    # each specialist's checkpoint stores its own robot, so embodied_distill.evaluate rebuilds that one
    saved = load_policy(run / "specialists" / "so100" / "checkpoint")[1]["task"]
    assert (saved["robot_uids"], saved["control_mode"], saved["max_episode_steps"]) == \
        ("so100", "pd_joint_pos", 120)
    # evaluating again on more seeds does not reuse the cached 2-episode evaluations
    more = [a for a in args if not a.startswith("eval.episodes=")] + ["eval.episodes=3",
                                                                      "distill.stages=[evaluate]"]
    out = _cli(tmp_path, *more)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    for row in report["per_embodiment"].values():
        assert {who: r["episodes"] for who, r in row.items()} == dict.fromkeys(row, 3)
        # re-evaluated on other seeds, a specialist's row still names its training run's steps
        assert row["specialist"]["env_steps"] >= 250 and "env_steps" not in row["generalist"]


def test_actions_relative_to_the_joint_positions_round_trip():
    """An embodiment with ``action_relative_to_state`` predicts offsets from its first Da state features."""
    torch.manual_seed(0)
    emb = [
        {"name": "panda", "obs_dim": 42, "action_dim": 7},
        {"name": "so100", "obs_dim": 36, "action_dim": 6, "action_relative_to_state": True},
    ]
    pol = CompassPolicy(
        CompassPolicyConfig(embodiments=emb, hidden_dims=(32,), embodiment="so100"),
        _normalizer({"panda": (42, 7), "so100": (36, 6)}),
    ).eval()
    state, action = torch.randn(4, 36), torch.randn(4, 6)
    norm = pol.normalize_action("so100", action, state)
    p = pol.normalizer.params["action/so100"]
    torch.testing.assert_close(norm[:, :6], (action - state[:, :6] - p["offset"]) * p["scale"])
    torch.testing.assert_close(pol.unnormalize_action("so100", norm, state), action)
    net = pol.distribution(pol.normalize_state("so100", state), torch.ones(4, dtype=torch.long))[0]
    chunk = pol.predict_action_chunk({"state": state[:, None]})
    torch.testing.assert_close(chunk[:, 0], net[:, :6] / p["scale"] + p["offset"] + state[:, :6])
    with pytest.raises(ValueError, match="pass the state"):
        pol.unnormalize_action("so100", norm)
    # an absolute embodiment ignores the state
    torch.testing.assert_close(
        pol.normalize_action("panda", torch.zeros(2, 7), torch.randn(2, 42)),
        pol.normalize_action("panda", torch.zeros(2, 7)),
    )


def test_benchmark_stage_times_survive_pieces_that_run_at_once(tmp_path):
    """benchmarks/compass.py runs the two specialists as parallel pieces; each adds its wall time to one
    stage_times.json, and neither may drop the other's (it used to read at start and write at the end)."""
    import multiprocessing as mp

    bench = _benchmark_module()
    times = tmp_path / "stage_times.json"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_add_times, args=(bench.add_stage_time, times, k)) for k in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert json.loads(times.read_text()) == {"a": 40.0, "b": 40.0}


def _benchmark_module():
    """benchmarks/compass.py, loaded as a module (benchmarks/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "compass.py"
    spec = importlib.util.spec_from_file_location("bench_compass", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _add_times(add, path, key):
    for _ in range(40):
        add(path, key, 1.0)


def test_benchmark_table_reports_success_at_any_step():
    """The benchmark table gives each robot's success_once beside the success at the end (the so100's
    policies reach the goal far more often than they end there), and a dash where a policy is missing."""
    import dataclasses

    from embodied_distill.distill.compass import Embodiment

    bench = _benchmark_module()

    def rates(end, once):
        return {"success_rate": end, "success_once_rate": once, "success_stderr": 0.02}

    report = {"per_embodiment": {"panda": {"base": rates(0.7, 0.75), "specialist": rates(0.9, 0.9),
                                           "generalist": rates(0.85, 0.875)},
                                 "so100": {"base": rates(0.15, 0.36), "specialist": rates(0.1, 0.31)}},
              "embodiments": [dataclasses.asdict(Embodiment("panda", "panda")),
                              dataclasses.asdict(Embodiment("so100", "so100", "pd_joint_pos"))],
              "mean_success": {"base": 0.425, "specialist": 0.5}, "targets": {}}
    md = bench.table(report, {"base": 10.0}, bench.FULL, "t", OmegaConf.create({"noise_std": 0.3,
                                                                                "noise_prob": 0.3}),
                     0.25, True, True)
    assert "(success_once; base / specialist / generalist): panda 0.75 / 0.90 / 0.88; so100 " \
        "0.36 / 0.31 / —." in md
    assert "fresh seeds" not in md and "Note:" not in md
    assert "30000 env steps each" in md  # no steps in the specialists' reports: the preset's
    report["per_embodiment"]["panda"]["specialist"]["env_steps"] = 1200000
    report["per_embodiment"]["so100"]["specialist"]["env_steps"] = 600000
    md_steps = bench.table(report, {"base": 10.0}, bench.FULL, "t",
                           OmegaConf.create({"noise_std": 0.3, "noise_prob": 0.3}), 0.25, True, True)
    assert "env steps panda 1200000, so100 600000 (" in md_steps and "env steps each" not in md_steps
    md = bench.table(report, {"base": 10.0}, bench.FULL, "t", OmegaConf.create({"noise_std": 0.3,
                                                                                "noise_prob": 0.3}),
                     0.25, True, True, confirm_episodes=100, note="resumed at 300k.")
    assert "the better of it and the last on 100 fresh seeds, step in brackets" in md
    assert md.splitlines()[-1] == "Note: resumed at 300k."
    assert "bootstrap" not in md
    report["mean_success"]["generalist"] = 0.85
    md = bench.table(report, {"base": 10.0}, bench.FULL, "t", OmegaConf.create({"noise_std": 0.3,
                                                                                "noise_prob": 0.3}),
                     0.25, True, True, intervals={"panda": [0.9, 1.0], "mean": [1.5, 2.5]})
    assert "| 0.94 [0.90, 1.00] |" in md and "| 2.00x the base [1.50, 2.50] |" in md
    assert "95% paired-bootstrap intervals" in md


@pytest.mark.sim
def test_base_dagger_round_adds_expert_labels_of_the_states_the_base_reached(tmp_path):
    """``base_dagger_rounds`` on the so100: the base rolls out, the scripted expert labels every state it
    visited (row 0 is the expert's action at the episode's first state), the base is refit on demos plus
    those rows, and a rerun of the stage reuses the saved rows instead of rolling out again."""
    from embodied_distill.sim.maniskill import ManiSkillEnvConfig, _scripted_expert, make_single_env

    run = tmp_path / "run"
    args = ["task=pickcube", "distill=compass", f"hydra.run.dir={run}", f"demos.dir={tmp_path / 'demos'}",
            "distill.demos_per_embodiment=2", "distill.base_steps=20", "distill.stages=[base]",
            "++distill.embodiments.1.base_dagger_rounds=1", "++distill.embodiments.1.base_dagger_episodes=1",
            "demos.num_workers=1", "device=cpu", "torch_threads=1"]
    out = _cli(tmp_path, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "base DAgger round 1, so100" in out.stdout
    with np.load(run / "base" / "dagger1.npz") as z:
        assert sorted(z.files) == ["so100/action", "so100/state"]  # the panda has no DAgger rounds
        states, labels = z["so100/state"], z["so100/action"]
    assert states.shape == (120, states.shape[1]) and labels.shape == (120, 6)
    env = make_single_env(ManiSkillEnvConfig(control_mode="pd_joint_pos", robot_uids="so100",
                                             max_episode_steps=120, sim_backend="cpu"))
    try:
        obs, _ = env.reset(seed=3_000_000 + 100_000)
        expert, _ = _scripted_expert(env, "pickcube")
        np.testing.assert_allclose(np.asarray(obs, np.float32).reshape(-1), states[0], atol=1e-6)
        np.testing.assert_allclose(expert(), labels[0], atol=1e-5)
    finally:
        env.close()
    meta = json.loads((run / "base" / "checkpoint" / "meta.json").read_text())
    assert meta["dagger1_rows"]["so100"] > 120 and (run / "base" / "round1" / "checkpoint").exists()
    # resume: the final checkpoint is gone, the saved rows and round fits are reused
    stamp = (run / "base" / "dagger1.npz").stat().st_mtime_ns
    shutil.rmtree(run / "base" / "checkpoint")
    out = _cli(tmp_path, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "base DAgger round 1" not in out.stdout
    assert (run / "base" / "dagger1.npz").stat().st_mtime_ns == stamp
    assert (run / "base" / "checkpoint" / "meta.json").exists()


def test_benchmark_ratio_intervals_are_paired_and_cover_the_point_estimate():
    """The paired bootstrap: a generalist that succeeds on exactly its specialist's seeds has the
    interval [1, 1] however few the seeds (unpaired resampling would spread it); otherwise the interval
    holds the point estimate and narrows with more seeds; a denominator that is mostly 0 gives None."""
    bench = _benchmark_module()
    rng = np.random.default_rng(3)
    spec = list(rng.random(60) < 0.3)
    same = bench.ratio_intervals({"so100": {"specialist": spec, "generalist": spec}})
    assert same["so100"] == [1.0, 1.0]

    def draw(n):
        base, gen = rng.random(n) < 0.2, rng.random(n) < 0.4
        return {"panda": {"base": list(base), "specialist": list(gen), "generalist": list(gen)},
                "so100": {"base": list(rng.random(n) < 0.1), "specialist": list(rng.random(n) < 0.15),
                          "generalist": list(rng.random(n) < 0.15)}}

    width = {}
    for n in (100, 2000):
        data = draw(n)
        out = bench.ratio_intervals(data)
        so = data["so100"]
        point = np.mean(so["generalist"]) / np.mean(so["specialist"])
        assert out["so100"][0] <= point <= out["so100"][1]
        mean = (np.mean(data["panda"]["generalist"]) + np.mean(so["generalist"])) / \
            (np.mean(data["panda"]["base"]) + np.mean(so["base"]))
        assert out["mean"][0] <= mean <= out["mean"][1]
        assert out["panda"] == [1.0, 1.0]
        width[n] = out["so100"][1] - out["so100"][0]
    assert width[2000] < 0.5 * width[100]
    rare = [False] * 99 + [True]
    assert bench.ratio_intervals({"so100": {"specialist": rare, "generalist": rare}})["so100"] is None
    with pytest.raises(ValueError, match="different numbers of seeds"):
        bench.ratio_intervals({"so100": {"specialist": spec, "generalist": spec[:-1]}})
