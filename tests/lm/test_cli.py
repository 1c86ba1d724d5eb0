"""The Hydra CLI (``python -m embodied_distill.lm.train``): configs compose, bad values fail early, tiny
end-to-end runs (in-process and as a subprocess with resume), and a two-process torchrun (gloo) run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import instantiate

from embodied_distill.lm.config import DistillConfig, LMConfig, OfflineConfig, TrainConfig
from embodied_distill.lm.train import CONFIG_DIR, build_task, run

TINY = [
    "teacher=tiny",
    "student=tiny",
    "train.batch_size=4",
    "train.eval_limit=4",
    "distill.max_new_tokens=4",
]
TINY += ["train.eval_max_new_tokens=4", "torch_threads=1", "device=cpu"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def test_every_option_composes_and_instantiates():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for group in ("teacher", "student", "task", "method"):
            for option in _options(group):
                extra = ["task.path=x.txt"] if option == "prompt_file" else []
                extra += [f"{group}.name_or_path=x"] if option == "hf" else []
                cfg = compose(config_name="train", overrides=[f"{group}={option}", *extra])
                lm = LMConfig(instantiate(cfg.distill), instantiate(cfg.offline), instantiate(cfg.train))
                assert isinstance(lm.distill, DistillConfig) and isinstance(lm.train, TrainConfig)
                if group == "method":
                    assert cfg.method_name == option
                if group == "task" and option != "prompt_file":
                    split = build_task(cfg)
                    assert split.train and split.test
        with pytest.raises(MissingConfigException, match="Available options in 'method'"):
            compose(config_name="train", overrides=["method=nope"])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"beta": 1.5}, "distill.beta must lie in"),
        ({"loss": "kl"}, "distill.loss must be one of"),
        ({"teacher_scoring": "sampled"}, "teacher_scoring=sampled"),
        ({"teacher_scoring": "topk", "loss": "taid"}, "teacher_scoring=topk"),
        ({"exopd_lambda": 2.0}, "ExOPD"),
        ({"loss": "sampled_reverse_kl", "teacher_scoring": "sampled", "lmbda": 0.5}, "lmbda=1"),
        ({"tip_fraction": 0.0}, "tip_fraction"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"context_template": "{prompt}"}, "context_template"),
    ],
)
def test_bad_distill_values_fail_at_start_with_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**kwargs)


def test_bad_train_and_offline_values_fail():
    with pytest.raises(ValueError, match="train.batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="offline.source"):
        OfflineConfig(source="web")
    with pytest.raises(ValueError, match="teacher_scoring=topk"):
        LMConfig(offline=OfflineConfig(enabled=True))


@pytest.mark.parametrize(
    "method", ["gkd", "opd", "offline", "opsd", "exopd", "tip", "taid", "topk", "seq_kd"]
)
def test_tiny_run_in_process(tmp_path, method):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY, f"method={method}", "train.steps=2"])
    report = run(cfg, tmp_path)
    assert report["steps"] == 2 and "exact_match" in report["after"]
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()
    assert (tmp_path / "checkpoint" / "tokenizer.json").is_file()
    if method != "opsd":
        assert report["after"]["reverse_kl_to_teacher"] >= 0
    if method == "offline":
        assert (tmp_path / "teacher_cache.safetensors").is_file() and report["offline_rows"] == report[
            "n_train"
        ]


def _cli(args, cwd, timeout=300, launcher=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [*(launcher or [sys.executable]), "-m", "embodied_distill.lm.train", *TINY, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_trains_saves_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    out = _cli(["train.steps=2", f"hydra.run.dir={run_dir}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoint" in out.stdout and (run_dir / "report.json").is_file()
    out = _cli(["train.steps=4", f"hydra.run.dir={run_dir}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout and "at step 2" in out.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == 4
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint")  # a plain save_pretrained directory
    assert model.config.num_hidden_layers == 1


def test_torchrun_two_processes_gloo(tmp_path):
    """Data-parallel run under torchrun: both ranks train on their own prompts, rank 0 saves and reports."""
    torchrun = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node=2",
                "--master_port=29547"]  # fmt: skip
    run_dir = tmp_path / "ddp"
    out = _cli(
        ["train.steps=2", "train.grad_accum=2", f"hydra.run.dir={run_dir}"], tmp_path, launcher=torchrun
    )
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    report = json.loads((run_dir / "report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 2
    assert (run_dir / "checkpoint" / "model.safetensors").is_file()
