"""Behaviour cloning from expert demonstrations (the walking skeleton's method).

Reads top to bottom: (1) collect or reuse demos, (2) fit the normaliser and build the policy,
(3) train with automatic resume from the last atomic training state, (4) save the checkpoint,
(5) evaluate on seeds no demo used and write ``report.json``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from embodied_distill import distributed
from embodied_distill.checkpoint import load_train_state, save_train_state
from embodied_distill.data.episode_store import EpisodeStore
from embodied_distill.data.normalizer import Normalizer
from embodied_distill.data.sampler import SequenceDataset
from embodied_distill.logging import MetricLogger
from embodied_distill.losses import ema_update
from embodied_distill.policies.base import build_policy
from embodied_distill.progress import progress


def demo_store_path(cfg: DictConfig) -> Path:
    d = cfg.demos
    size = cfg.sim.get("runner", {}).get("image_size", "")
    rgb = f"_rgb{size}" if cfg.task.get("obs_mode") == "rgb" else ""  # stores with images are their own
    return Path(d.dir) / (f"{cfg.task.name}_{cfg.task.control_mode}_{cfg.task.expert}{rgb}"
                          f"_noise{d.noise_std}x{d.noise_prob}.zarr")


def read_demos(cfg: DictConfig, store_path: Path) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """The first ``demos.n_episodes`` demos: ``({"state": (N, Do), "action": (N, Da)}, ends (E,),
    largest demo seed)``; refuses demos whose seeds reach the evaluation seeds.

    Images the student reads (e.g. ``rgb`` (N, V, H, W, 3) uint8) are loaded too, and a student that reads
    ``instruction`` gets each step's instruction string (N,) from the per-episode ``meta/instruction``."""
    store = EpisodeStore(store_path, mode="r")
    max_demo_seed = int(store.episode_meta("seed")[: cfg.demos.n_episodes].max())
    if max_demo_seed >= cfg.eval.seed_start:
        raise ValueError(f"evaluation seeds (eval.seed_start={cfg.eval.seed_start}) overlap the demo seeds "
                         f"(up to {max_demo_seed}); raise eval.seed_start or lower demos.seed_start")
    ends = store.episode_ends[: cfg.demos.n_episodes]
    obs_keys = list(cfg.student.get("obs_keys", ["state"]))
    extra = [k for k in obs_keys if k in store.keys and k not in ("state", "action")]
    data = {k: v[: ends[-1]] for k, v in store.load(["state", "action", *extra]).items()}
    if "instruction" in obs_keys:
        if "instruction" not in store.root["meta"]:
            raise ValueError(f"the student reads instructions but demo store {store_path} has none "
                             "(meta/instruction); use a language-conditioned suite such as sim=libero")
        texts = store.episode_meta("instruction")[: len(ends)]
        data["instruction"] = np.repeat(texts.astype(str), np.diff(ends, prepend=0))
    return data, ends, max_demo_seed


def sequence_dataset(policy, data: dict[str, np.ndarray], ends: np.ndarray, start_steps: int = 0,
                     start_repeat: int = 1) -> SequenceDataset:
    """Training windows shaped for ``policy`` (its obs keys, To and Ta); the first ``start_steps`` steps of
    every episode drawn ``start_repeat`` times as often (``distill.start_steps`` / ``start_repeat``)."""
    pcfg = policy.config
    return SequenceDataset(data, ends, obs_keys=list(pcfg.obs_keys), obs_horizon=pcfg.obs_horizon,
                           action_horizon=pcfg.action_horizon, start_steps=start_steps,
                           start_repeat=start_repeat)


def build_student(cfg: DictConfig, data: dict[str, np.ndarray], device: torch.device):
    """The ``student`` policy with a normaliser fitted on ``data`` (sizes taken from the data)."""
    normalizer = Normalizer.fit({k: data[k] for k in ("state", "action")}, mode=cfg.distill.normalizer_mode,
                                eps=cfg.distill.normalizer_eps)
    student_cfg = OmegaConf.to_container(cfg.student, resolve=True)
    student_cfg.pop("train", None)  # the student's training budget, read through distill.* (bc.yaml)
    student_cfg.update(obs_dim=int(data["state"].shape[-1]), action_dim=int(data["action"].shape[-1]))
    return build_policy(student_cfg.pop("name"), student_cfg, normalizer).to(device)


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 0; a pure function of the step, so resume is exact."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def ema_decay_at(step: int, max_decay: float) -> float:
    """Weight-EMA decay with warm-up, ``min(max_decay, (1 + step) / (10 + step))``: early averages forget
    the random initialisation quickly; 0 turns the EMA off."""
    return min(max_decay, (1 + step) / (10 + step)) if max_decay > 0 else 0.0


def student_ema_decay(cfg: DictConfig, policy) -> float:
    """``distill.ema_decay``, or the student's own default when null (diffusion 0.999, others off)."""
    value = cfg.distill.get("ema_decay", None)
    return float(getattr(policy, "default_ema_decay", 0.0) if value is None else value)


def train_phase(name: str, policy, loss_fn, steps: int, cfg: DictConfig, dataset: SequenceDataset,
                gen: torch.Generator, state_dir: Path, logger: MetricLogger | None, device: torch.device,
                params: list[torch.nn.Parameter] | None = None, after_step=None,
                ema_decay: float = 0.0) -> int:
    """AdamW + warm-up/cosine LR on ``loss_fn(batch) -> (loss, metrics)``; resumes from ``state_dir``.

    The training state (all policy weights, optimizer, sampler RNG, step, and the weight EMA) is written
    atomically every ``distill.checkpoint_every`` steps, so ``kill -9`` loses at most that many steps.
    With ``ema_decay > 0`` an exponential moving average of the trained weights (as Diffusion Policy) is
    kept and copied into the policy when the phase ends: the saved and evaluated weights are the EMA.
    """
    dcfg = cfg.distill
    trained = list(params or policy.parameters())
    optimizer = torch.optim.AdamW(trained, lr=dcfg.lr, weight_decay=dcfg.weight_decay)
    ema = [p.detach().clone() for p in trained] if ema_decay > 0 else []
    step = 0
    resumed = load_train_state(state_dir) if cfg.resume else None
    if resumed is not None:
        policy.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        if ema:
            saved = resumed["extra_tensors"]
            if "ema.0" not in saved:
                raise ValueError(f"{state_dir} was written without a weight EMA but distill.ema_decay="
                                 f"{ema_decay}; resume with the same setting or start a new run dir")
            for i, e in enumerate(ema):
                e.copy_(saved[f"ema.{i}"])
        gen.set_state(resumed["extra_tensors"]["sampler_rng"])  # rank 0's stream
        step = resumed["step"]
        rank = distributed.init()[0]
        if rank > 0:  # other ranks need their own, still reproducible, batch stream
            gen.manual_seed(int(cfg.seed) + 1000 * rank + step)
        print(f"[{name}] resuming from {state_dir} at step {step}/{steps}")
    distributed.broadcast_parameters(policy)
    policy.train()
    bar = progress(total=steps, initial=step, desc=f"train {name}", unit="step",
                   disable=not distributed.is_main())
    t0, losses = time.perf_counter(), []
    while step < steps:
        idx = torch.randint(len(dataset), (dcfg.batch_size,), generator=gen)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in dataset.get_batch(idx).items()}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, dcfg.lr, dcfg.warmup_steps, steps)
        loss, _ = loss_fn(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite {name} loss at step {step}; last state is in {state_dir}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(trained)
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, dcfg.grad_clip)
        optimizer.step()
        if ema:
            with torch.no_grad():
                ema_update(ema, trained, ema_decay_at(step, ema_decay))
        if after_step is not None:
            after_step()
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        if distributed.is_main() and (step % dcfg.log_every == 0 or step == steps):
            logger.log(step, {f"{name}/loss": float(np.mean(losses)),
                              f"{name}/lr": optimizer.param_groups[0]["lr"],
                              f"{name}/grad_norm": float(grad_norm),
                              f"{name}/steps_per_s": len(losses) / (time.perf_counter() - t0)})
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", refresh=False)
            t0, losses = time.perf_counter(), []
        if distributed.is_main() and (step % dcfg.checkpoint_every == 0 or step == steps):
            save_train_state(state_dir, step, policy.state_dict(), optimizer,
                             extra_tensors={"sampler_rng": gen.get_state(),
                                            **{f"ema.{i}": e for i, e in enumerate(ema)}})
    bar.close()
    if ema:  # evaluate and save the averaged weights
        with torch.no_grad():
            for p, e in zip(trained, ema):
                p.copy_(e)
    policy.eval()
    return step


def run(cfg: DictConfig, run_dir: Path, runner, device: torch.device) -> dict[str, Any] | None:
    dcfg = cfg.distill
    rank, world = distributed.init()  # torchrun: data-parallel over `world` processes
    if world > 1 and rank == 0:
        print(f"[bc] data-parallel training over {world} processes (gradients all-reduced)")
    # ---------------------------------------------------------------- 1. demonstrations
    store_path = demo_store_path(cfg)
    if cfg.demos.seed_start + cfg.demos.n_episodes * 3 > cfg.eval.seed_start:
        raise ValueError("demo seeds could reach eval.seed_start: "
                         "raise eval.seed_start or lower demos.n_episodes")
    summary = None
    if distributed.is_main():  # other ranks wait, then read the finished store
        summary = runner.collect_demos(store_path, cfg.demos.n_episodes, seed_start=cfg.demos.seed_start,
                                       num_workers=cfg.demos.num_workers, noise_std=cfg.demos.noise_std,
                                       noise_prob=cfg.demos.noise_prob)
    distributed.barrier()
    data, ends, max_demo_seed = read_demos(cfg, store_path)
    print(f"[bc] demos: {len(ends)} episodes, {ends[-1]} steps from {store_path} ({summary})")

    # ---------------------------------------------------------------- 2. normaliser + policy
    policy = build_student(cfg, data, device)
    dataset = sequence_dataset(policy, data, ends, int(dcfg.get("start_steps", 0)),
                               int(dcfg.get("start_repeat", 1)))
    gen = torch.Generator().manual_seed(int(cfg.seed) + 1000 * rank)  # each rank draws its own batches
    logger = MetricLogger(run_dir) if rank == 0 else None

    # ---------------------------------------------------------------- 3. train (resumable)
    step = train_phase("bc", policy, policy.compute_loss, dcfg.steps, cfg, dataset, gen,
                       run_dir / "train_state", logger, device, ema_decay=student_ema_decay(cfg, policy))
    if dcfg.consistency_steps > 0 and hasattr(policy, "consistency_loss"):
        # phase 2 (diffusion students): distil the 1-step consistency head from the trained sampler
        state_dir = run_dir / "train_state_consistency"
        if not (state_dir / "train_state.json").exists():
            policy.init_consistency_from_teacher()
        step += train_phase("consistency", policy, policy.consistency_loss, dcfg.consistency_steps, cfg,
                            dataset, gen, state_dir, logger, device,
                            params=list(policy.consistency_unet.parameters()),
                            after_step=policy.update_consistency_ema)

    # ---------------------------------------------------------------- 4. checkpoint
    distributed.barrier()
    if rank != 0:  # rank 0 alone saves and evaluates
        distributed.shutdown()
        return None
    ckpt = policy.save_pretrained(run_dir / "checkpoint",
                                  train_config=OmegaConf.to_container(cfg, resolve=True),
                                  meta={"step": step, "demo_store": str(store_path),
                                        "demo_episodes": int(len(ends)), "max_demo_seed": max_demo_seed})
    print(f"[bc] checkpoint written to {ckpt}")

    # ---------------------------------------------------------------- 5. evaluate
    policy.to("cpu")
    report = runner.evaluate(policy, cfg.eval.episodes, cfg.eval.seed_start, num_envs=cfg.eval.num_envs,
                             video_path=run_dir / "eval.mp4" if cfg.eval.video_episodes > 0 else None,
                             video_episodes=cfg.eval.video_episodes)
    report.update(checkpoint=str(ckpt), train_steps=step, demo_episodes=int(len(ends)),
                  max_demo_seed=max_demo_seed)
    logger.log(step, {"eval/success_rate": report["success_rate"], "eval/mean_return": report["mean_return"]})
    logger.close()
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    distributed.shutdown()
    return report
