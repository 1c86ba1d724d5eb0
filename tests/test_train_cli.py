"""End-to-end smoke tests of the entry points in real subprocesses (real ManiSkill, real zarr)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.sim

TINY = ["sim=maniskill", "task=pickcube", "student=mlp", "demos.n_episodes=4", "eval.episodes=2",
        "eval.num_envs=1", "eval.video_episodes=1", "distill.log_every=20", "torch_threads=1"]


def _train(tmp_path, extra, **kw):
    cmd = [sys.executable, "-m", "embodied_distill.train", *TINY, f"demos.dir={tmp_path / 'demos'}",
           f"hydra.run.dir={tmp_path / 'run'}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, **kw)


def test_train_then_evaluate_end_to_end(tmp_path):
    out = _train(tmp_path, ["distill.steps=300", "distill.checkpoint_every=100"])
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    for key in ("success_rate", "episodes", "mean_return", "mean_episode_length",
                "latency_ms_per_action_p50"):
        assert key in report
    assert report["episodes"] == 2 and min(report["seeds"]) > report["max_demo_seed"]
    assert (run / "eval.mp4").stat().st_size > 1000
    assert list((run / "tb").iterdir())
    losses = [json.loads(line)["bc/loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "bc/loss" in line]
    assert losses[-1] < 0.5 * losses[0], losses  # training measurably fits the demos
    assert "success rate" in out.stdout

    ev = subprocess.run([sys.executable, "-m", "embodied_distill.evaluate",
                         f"checkpoint={run / 'checkpoint'}", "episodes=2", "num_envs=1",
                         f"hydra.run.dir={tmp_path / 'eval'}"],
                        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    ev_report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert ev_report["seeds"] == report["seeds"]
    # deterministic policy + seeded envs: the same episodes give the same outcomes
    assert [e["success"] for e in ev_report["per_episode"]] == [e["success"] for e in report["per_episode"]]
    assert ev_report["mean_return"] == pytest.approx(report["mean_return"], rel=1e-3)
    assert (tmp_path / "eval" / "eval.mp4").exists()

    bad = tmp_path / "bad_ckpt"
    bad.mkdir()
    for f in (run / "checkpoint").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    ev = subprocess.run([sys.executable, "-m", "embodied_distill.evaluate", f"checkpoint={bad}",
                         f"hydra.run.dir={tmp_path / 'eval2'}"], capture_output=True, text=True,
                        cwd=tmp_path, timeout=300)
    assert ev.returncode == 2 and "corrupt" in ev.stderr


def test_kill_9_mid_training_resumes_from_last_checkpoint(tmp_path):
    extra = ["distill.steps=3000", "distill.checkpoint_every=100", "eval.video_episodes=0",
             "student.hidden_dims=[128,128]"]
    cmd = [sys.executable, "-m", "embodied_distill.train", *TINY, f"demos.dir={tmp_path / 'demos'}",
           f"hydra.run.dir={tmp_path / 'run'}", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path,
                            start_new_session=True)
    state = tmp_path / "run" / "train_state" / "train_state.json"
    deadline = time.time() + 400
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert state.exists(), proc.stdout.read().decode()[-3000:] if proc.poll() is not None else "timeout"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved_step = json.loads(state.read_text())["step"]
    assert 100 <= saved_step < 3000
    out = _train(tmp_path, extra)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = [line for line in out.stdout.splitlines() if "resuming from" in line]
    assert resumed and f"at step {saved_step}/3000" in resumed[0], out.stdout[-2000:]
    assert json.loads(state.read_text())["step"] == 3000
    assert json.loads((tmp_path / "run" / "report.json").read_text())["train_steps"] == 3000


def test_torchrun_two_process_data_parallel_smoke(tmp_path):
    """Training runs unchanged under torchrun (gloo on CPU): rank 0 saves, evaluates and reports."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node=2", "--master_port=29533", "-m", "embodied_distill.train", *TINY,
           "student=diffusion", "student.down_dims=[16,32]", "student.step_embed_dim=16",
           "student.num_inference_steps=2", "distill.steps=20", "distill.consistency_steps=4",
           "distill.batch_size=16", "eval.video_episodes=0", "eval.episodes=1",
           f"demos.dir={tmp_path / 'demos'}", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    assert "data-parallel training over 2 processes" in out.stdout
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["train_steps"] == 24 and report["episodes"] == 1
    assert json.loads((tmp_path / "run" / "train_state" / "train_state.json").read_text())["step"] == 20


def test_evaluate_takes_sampler_overrides_as_the_readme_writes_them():
    """``sampler_overrides='{num_inference_steps: 100}'`` (README) composes; with an empty-dict default
    Hydra refused the new keys (struct mode)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="embodied_distill.configs", version_base="1.3"):
        overrides = ["checkpoint=x", "sampler=rti",
                     "sampler_overrides={num_inference_steps: 100, rti_steps: [11, 0]}"]
        cfg = compose(config_name="evaluate", overrides=overrides)
        plain = compose(config_name="evaluate", overrides=["checkpoint=x"])
    assert OmegaConf.to_container(cfg.sampler_overrides) == {"num_inference_steps": 100, "rti_steps": [11, 0]}
    assert plain.sampler_overrides is None
