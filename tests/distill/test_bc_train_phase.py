"""bc.train_phase: the weight EMA equals its closed-form recursion and survives a crash + resume exactly."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from embodied_distill.distill.bc import build_student, ema_decay_at, sequence_dataset, train_phase
from embodied_distill.logging import MetricLogger


def _setup():
    rng = np.random.default_rng(0)
    data = {"state": rng.normal(size=(200, 4)).astype(np.float32),
            "action": rng.uniform(-1, 1, size=(200, 2)).astype(np.float32)}
    ends = np.array([50, 100, 150, 200])
    cfg = OmegaConf.create({
        "seed": 0, "resume": True,
        "student": {"name": "mlp", "hidden_dims": [16, 16], "obs_horizon": 2, "action_horizon": 4,
                    "n_action_steps": 1},
        "distill": {"lr": 1e-2, "weight_decay": 0.0, "warmup_steps": 2, "batch_size": 16, "grad_clip": 1.0,
                    "log_every": 1000, "checkpoint_every": 5, "normalizer_mode": "limits",
                    "normalizer_eps": 0.01},
    })
    torch.manual_seed(0)
    policy = build_student(cfg, data, torch.device("cpu"))
    return cfg, policy, sequence_dataset(policy, data, ends)


CPU = torch.device("cpu")


class Crash(RuntimeError):
    pass


def test_ema_weights_follow_the_recursion(tmp_path):
    cfg, policy, dataset = _setup()
    params = list(policy.parameters())
    ema = [p.detach().clone() for p in params]
    step = [0]

    def record():  # raw weights after each optimizer step -> the EMA recursion, computed independently
        d = min(0.9, (1 + step[0]) / (10 + step[0]))
        for e, p in zip(ema, params):
            e.mul_(d).add_(p.detach(), alpha=1 - d)
        step[0] += 1

    train_phase("t", policy, policy.compute_loss, 12, cfg, dataset, torch.Generator().manual_seed(0),
                tmp_path / "state", MetricLogger(tmp_path), CPU, after_step=record, ema_decay=0.9)
    assert step[0] == 12
    for e, p in zip(ema, params):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1) and ema_decay_at(10_000, 0.999) == 0.999
    assert ema_decay_at(5, 0.0) == 0.0


def test_crash_and_resume_reproduce_the_uninterrupted_ema(tmp_path):
    cfg, policy, dataset = _setup()
    init = {k: v.clone() for k, v in policy.state_dict().items()}
    train_phase("t", policy, policy.compute_loss, 12, cfg, dataset, torch.Generator().manual_seed(0),
                tmp_path / "a", MetricLogger(tmp_path), CPU, ema_decay=0.9)
    reference = {k: v.clone() for k, v in policy.state_dict().items()}

    policy.load_state_dict(init)
    calls = [0]

    def crash_at_8():
        calls[0] += 1
        if calls[0] == 8:
            raise Crash  # after the state at step 5 was written
    with pytest.raises(Crash):
        train_phase("t", policy, policy.compute_loss, 12, cfg, dataset, torch.Generator().manual_seed(0),
                    tmp_path / "b", MetricLogger(tmp_path), CPU, after_step=crash_at_8, ema_decay=0.9)
    policy.load_state_dict(init)  # a fresh process: nothing survives but the training state on disk
    train_phase("t", policy, policy.compute_loss, 12, cfg, dataset, torch.Generator().manual_seed(0),
                tmp_path / "b", MetricLogger(tmp_path), CPU, ema_decay=0.9)
    for k, v in reference.items():
        torch.testing.assert_close(policy.state_dict()[k], v, rtol=0, atol=0)

    # a state written without an EMA cannot silently resume with one
    with pytest.raises(ValueError, match="without a weight EMA"):
        train_phase("t", policy, policy.compute_loss, 14, cfg, dataset, torch.Generator().manual_seed(0),
                    tmp_path / "b_noema", MetricLogger(tmp_path), CPU, ema_decay=0.0)
        train_phase("t", policy, policy.compute_loss, 16, cfg, dataset, torch.Generator().manual_seed(0),
                    tmp_path / "b_noema", MetricLogger(tmp_path), CPU, ema_decay=0.9)


def test_sequence_dataset_draws_episode_starts_more_often():
    policy = _setup()[1]
    rng = np.random.default_rng(0)
    demo = {"state": rng.normal(size=(200, 4)).astype(np.float32),
            "action": rng.uniform(-1, 1, size=(200, 2)).astype(np.float32)}
    ends = np.array([50, 100, 150, 200])
    plain = sequence_dataset(policy, demo, ends)
    early = sequence_dataset(policy, demo, ends, start_steps=3, start_repeat=4)
    assert len(early) == len(plain) + 4 * 3 * (4 - 1)  # 3 start windows per episode, 3 extra copies each
