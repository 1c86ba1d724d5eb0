"""COMPASS: cross-embodiment merging of residual-RL specialists into one generalist.

Paper: "COMPASS: Cross-embOdiment Mobility Policy via ResiduAl RL and Skill Synthesis"
(https://arxiv.org/abs/2502.16372, code NVlabs/COMPASS); see ``shared/reference/methods.md``.

    python -m embodied_distill.train task=pickcube distill=compass torch_threads=1
    python -m embodied_distill.train sim=navigation task=pointnav distill=compass_nav torch_threads=1

Every embodiment (``distill.embodiments``: robot, control mode, expert, episode limit; a new robot joins
by adding an entry) shares one embodiment-agnostic policy interface
(:class:`embodied_distill.policies.compass.CompassPolicy`: per-robot normalised states and actions,
zero-padded and masked to common widths, plus a one-hot or learned embodiment code). Stages, each
resumable and selectable with ``distill.stages`` (so a long run splits into short pieces):

1. ``base``: demos per embodiment (scripted expert or ManiSkill's motion planner, cached in
   ``demos.dir``), then one IL base trained by behaviour cloning on all of them (masked MSE);
2. ``specialists``: per embodiment, residual PPO on top of the frozen base
   (:func:`embodied_distill.distill.residual_rl.train_residual`, zero-initialised residual);
3. ``generalist``: the specialists roll out on their robots and their Gaussians are recorded; optional
   DAgger rounds let the generalist act while the specialists label; one generalist (same interface,
   global learnable std, init 0.1) is distilled with ``KL(specialist || generalist)`` from the loss core
   (``gaussian_kl``, or ``masked_mse`` on the means), lr 1e-3, ``epochs`` passes;
4. ``evaluate``: success of the base, each specialist and the generalist on every embodiment, on the
   same unseen seeds -> ``report.json``.

Run-dir layout: ``base/``, ``specialists/<name>/``, ``generalist/`` (each with ``checkpoint/`` and a
resumable ``train_state/``), ``generalist/data_round<k>.npz``, ``report.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from embodied_distill.data.episode_store import EpisodeStore
from embodied_distill.data.normalizer import Normalizer
from embodied_distill.dataclass_config import dataclass_from_cfg
from embodied_distill.distill.bc import train_phase
from embodied_distill.distill.rpd import RPDConfig
from embodied_distill.logging import MetricLogger
from embodied_distill.losses import gaussian_kl, masked_mse
from embodied_distill.policies.base import load_policy
from embodied_distill.policies.compass.modeling_compass import pad_features

STAGES = ("base", "specialists", "generalist", "evaluate")
EXPERTS = ("scripted", "motionplanner")


@dataclasses.dataclass
class Embodiment:
    """One robot setting of the task (an entry of ``distill.embodiments``)."""

    name: str
    """Key of this embodiment (code slot order = list order; names the run sub-directories)."""
    robot_uids: str
    """ManiSkill robot (``panda``, ``so100`` ship offline; see the README for ``fetch``), or for a navigation
    task the mobile base (``diffdrive``, ``holonomic``; sim/navigation.py)."""
    control_mode: str = "pd_ee_delta_pose"
    """ManiSkill controller (the expert must produce actions for it); ``body_velocity`` for navigation."""
    expert: str = "scripted"
    """Demo source: ``scripted`` (sim/maniskill.py: the pd_ee_delta_pose experts, and joint-space ones such as
    the so100's in sim/so100_expert.py) or ``motionplanner`` (ManiSkill's mplib solutions)."""
    max_episode_steps: int = 50
    """Episode limit on this robot (training and evaluation)."""
    demos: int | None = None
    """Successful demos of this robot for the IL base (None: ``distill.demos_per_embodiment``)."""
    demo_noise_std: float | None = None
    """DART noise on the expert's executed actions (env units of this robot's controller; recorded labels
    stay clean). None: ``demos.noise_std`` for a scripted expert (the units that group is written in),
    0 for the motion planner."""
    demo_noise_prob: float | None = None
    """Probability that a demo step's executed action is perturbed. None: as ``demo_noise_std``."""
    action_relative_to_state: bool = False
    """The policy predicts the action as an offset from the first Da state features (the joint positions):
    for absolute joint-position control, where BC on the absolute targets is too coarse to grasp."""
    base_dagger_rounds: int = 0
    """DAgger rounds for the IL base on this robot: the base acts, the scripted expert labels every state
    it visits, and the base is refit on the demos plus all labelled rows (needs ``expert: scripted``, a
    state feedback law; 0: behaviour cloning on the demos only)."""
    base_dagger_episodes: int = 30
    """Base rollouts of this robot per DAgger round."""
    residual_scale: float | None = None
    """This robot's specialist residual scale (env action units per unit of residual). None:
    ``distill.specialist.residual_scale``. Joint-position robots need a smaller one than an end-effector
    delta controller: 0.25 there is up to 0.25 rad of exploration per joint per step."""

    def __post_init__(self):
        if self.expert not in EXPERTS:
            raise ValueError(f"embodiment {self.name!r}: expert must be one of {EXPERTS}, "
                             f"got {self.expert!r}")
        if self.max_episode_steps < 1:
            raise ValueError(f"embodiment {self.name!r}: max_episode_steps must be >= 1")
        if self.demos is not None and self.demos < 1:
            raise ValueError(f"embodiment {self.name!r}: demos must be >= 1")
        if self.demo_noise_std is not None and self.demo_noise_std < 0 or \
                self.demo_noise_prob is not None and not 0 <= self.demo_noise_prob <= 1:
            raise ValueError(f"embodiment {self.name!r}: demo_noise_std must be >= 0 and demo_noise_prob "
                             "in [0, 1]")
        if self.base_dagger_rounds < 0 or self.base_dagger_episodes < 1:
            raise ValueError(f"embodiment {self.name!r}: base_dagger_rounds must be >= 0 and "
                             "base_dagger_episodes >= 1")
        if self.base_dagger_rounds and self.expert != "scripted":
            raise ValueError(f"embodiment {self.name!r}: base DAgger needs a reactive expert to label the "
                             f"states the base reaches (expert: scripted), not {self.expert!r}")
        if self.residual_scale is not None and not 0.0 < self.residual_scale <= 2.0:
            raise ValueError(f"embodiment {self.name!r}: residual_scale must be in (0, 2], "
                             f"got {self.residual_scale}")

    def demo_noise(self, demos: DictConfig) -> tuple[float, float]:
        """(std, prob) of this robot's demo noise: its own fields, else the ``demos`` group's for a scripted
        expert (pd_ee_delta_pose units) and none for the motion planner (joint targets in radians)."""
        default = (demos.noise_std, demos.noise_prob) if self.expert == "scripted" else (0.0, 0.0)
        std = default[0] if self.demo_noise_std is None else self.demo_noise_std
        prob = default[1] if self.demo_noise_prob is None else self.demo_noise_prob
        return float(std), float(prob)

    def demo_count(self, default: int) -> int:
        """Demos of this robot for the IL base: its own ``demos``, else ``default``
        (``distill.demos_per_embodiment``)."""
        return self.demos or default


@dataclasses.dataclass
class CompassConfig:
    """The ``distill`` config group of ``compass`` (``configs/distill/compass.yaml``)."""

    name: str = "compass"
    """Config name (``compass``, or a variant's such as ``compass_nav``; names the default run dir)."""
    method: str = "compass"
    """The method module train.py runs (embodied_distill/distill/compass.py), also for variants."""
    embodiments: tuple[Embodiment, ...] = ()
    """The robots to merge (dicts in YAML, see :class:`Embodiment`)."""
    stages: tuple[str, ...] = STAGES
    """Stages to run now (subset of base, specialists, generalist, evaluate); finished ones are reused."""
    only: tuple[str, ...] = ()
    """Restrict the ``specialists`` stage to these embodiments (empty: all), to split it into pieces."""
    policy: dict[str, Any] = dataclasses.field(default_factory=dict)
    """CompassPolicyConfig fields (hidden_dims, embedding, max_obs_dim, max_action_dim, ...)."""
    demos_per_embodiment: int = 100
    """Successful demos per embodiment for the IL base (seeds demos.seed_start, ...)."""
    base_steps: int = 5000
    """Gradient steps of the IL base (behaviour cloning, masked MSE on normalised padded actions)."""
    specialist: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Residual PPO settings (RPDConfig fields; the distillation term is off)."""
    data_episodes: int = 50
    """Specialist rollouts per embodiment recorded for distillation."""
    data_action: str = "sample"
    """Action the specialists execute while recording: ``sample`` (their Gaussian) or ``mean``."""
    dagger_rounds: int = 0
    """DAgger rounds after the first fit: the generalist acts, the specialists label, refit on all data."""
    dagger_episodes: int = 20
    """Generalist rollouts per embodiment per DAgger round."""
    distill_loss: str = "kl"
    """``kl``: KL(specialist || generalist) of the Gaussians (COMPASS); ``mse``: MSE of the means."""
    teacher_min_std: float = 0.01
    """Floor on the specialists' std (normalised units) in the KL."""
    epochs: int = 100
    """Passes over the distillation data per fit (COMPASS: 100)."""
    state_noise_copies: int = 0
    """Perturbed copies of every recorded state added to each fit, labelled by that robot's specialist
    (which can be queried anywhere, so they cost no env steps); 0: off (COMPASS)."""
    state_noise: float = 0.1
    """Std of those perturbations per state feature, in units of its normalisation spread (1 / scale)."""
    init_generalist_from_base: bool = False
    """Start the generalist from the IL base's weights (COMPASS trains it from scratch)."""
    optim: dict[str, Any] = dataclasses.field(default_factory=dict)
    """bc.train_phase settings for both fits: lr, weight_decay, warmup_steps, batch_size, grad_clip,
    log_every, checkpoint_every."""

    def __post_init__(self):
        self.embodiments = tuple(e if isinstance(e, Embodiment) else Embodiment(**e)
                                 for e in self.embodiments)
        self.stages, self.only = tuple(self.stages), tuple(self.only)
        names = [e.name for e in self.embodiments]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"distill.embodiments needs unique names, got {names}")
        bad = sorted(set(self.stages) - set(STAGES))
        if bad:
            raise ValueError(f"unknown stage(s) {bad}; choose from {STAGES}")
        if sorted(set(self.only) - set(names)):
            raise ValueError(f"distill.only {list(self.only)} names unknown embodiments; have {names}")
        if self.data_action not in ("sample", "mean"):
            raise ValueError(f"data_action must be sample or mean, got {self.data_action!r}")
        if self.distill_loss not in ("kl", "mse"):
            raise ValueError(f"distill_loss must be kl or mse, got {self.distill_loss!r}")
        if min(self.demos_per_embodiment, self.base_steps, self.data_episodes, self.epochs) < 1:
            raise ValueError("demos_per_embodiment, base_steps, data_episodes and epochs must be >= 1")
        if self.dagger_rounds < 0 or self.dagger_episodes < 1 or self.teacher_min_std <= 0:
            raise ValueError("dagger_rounds >= 0, dagger_episodes >= 1 and teacher_min_std > 0 required")
        if self.state_noise_copies < 0 or self.state_noise <= 0:
            raise ValueError("state_noise_copies >= 0 and state_noise > 0 required")
        RPDConfig.from_cfg({**self.specialist, "name": "residual_rl", "distill_coef": 0.0})  # validate now

    @classmethod
    def from_cfg(cls, dcfg: DictConfig | dict) -> CompassConfig:
        return dataclass_from_cfg(cls, dcfg, "distill config")


# ---------------------------------------------------------------------------- helpers
def embodiment_task(cfg: DictConfig, emb: Embodiment) -> dict[str, Any]:
    """The task config with one embodiment's robot, controller, expert and episode limit (what its
    runner is built from, and what a specialist's checkpoint stores, so that ``embodied_distill.evaluate``
    rebuilds the right robot)."""
    task = OmegaConf.to_container(cfg.task, resolve=True)
    task.update(robot_uids=emb.robot_uids, control_mode=emb.control_mode, expert=emb.expert,
                max_episode_steps=emb.max_episode_steps)
    if task.get("sim") == "navigation":
        task["robot"] = emb.robot_uids
    return task


def make_runner(cfg: DictConfig, emb: Embodiment):
    """The task's runner for one embodiment: ManiSkill, or point-goal navigation for a
    ``sim: navigation`` task."""
    task = embodiment_task(cfg, emb)
    if task.get("sim") == "navigation":
        from embodied_distill.sim.navigation import NavigationRunner

        return NavigationRunner(task)
    from embodied_distill.sim.maniskill import ManiSkillRunner

    return ManiSkillRunner(task, sim_backend=cfg.sim.runner.get("sim_backend", "auto"))


def demo_path(cfg: DictConfig, emb: Embodiment) -> Path:
    """Demo store of one embodiment; the panda's is the one ``distill=bc`` uses (shared cache)."""
    robot = "" if emb.robot_uids == "panda" else f"{emb.robot_uids}_"
    std, prob = emb.demo_noise(cfg.demos)
    name = f"{cfg.task.name}_{robot}{emb.control_mode}_{emb.expert}_noise{std}x{prob}.zarr"
    return Path(cfg.demos.dir) / name


def phase_cfg(cfg: DictConfig, ccfg: CompassConfig) -> DictConfig:
    """The config view bc.train_phase reads (``distill.*`` optimiser settings, ``resume``, ``seed``)."""
    return OmegaConf.create({"distill": dict(ccfg.optim), "resume": bool(cfg.resume), "seed": int(cfg.seed)})


class BalancedData:
    """Flat rows from several embodiments, indexed so every embodiment fills an equal share:
    item ``i`` is row ``(i % n_max) % n_e`` of embodiment ``e = i // n_max``. ``get_batch(idx)`` returns
    the stored tensors' rows (``embodiment`` (B,), ``state`` (B, Do), ...)."""

    def __init__(self, parts: list[dict[str, Tensor]]):
        self.parts = parts
        self.n_max = max(len(p["state"]) for p in parts)

    def __len__(self) -> int:
        return self.n_max * len(self.parts)

    def get_batch(self, idx: Tensor) -> dict[str, Tensor]:
        rows: dict[str, list[Tensor]] = {}
        for e, part in enumerate(self.parts):
            sel = idx[idx // self.n_max == e] % self.n_max % len(part["state"])
            for k, v in part.items():
                rows.setdefault(k, []).append(v[sel])
        return {k: torch.cat(v) for k, v in rows.items()}


# ---------------------------------------------------------------------------- the distillation loss
def generalist_loss(kind: str, mean: Tensor, log_std: Tensor, teacher_mean: Tensor, teacher_log_std: Tensor,
                    mask: Tensor) -> Tensor:
    """Specialist -> generalist loss on padded normalised actions, all (B, Da) (``log_std`` may be (Da,)).

    ``kl``: ``KL(N(teacher) || N(student))`` (COMPASS's direction) from :func:`gaussian_kl`; on masked
    (absent) dims the student's statistics are replaced by the teacher's, so they add exactly 0.
    ``mse``: masked MSE of the means. The teacher is detached here.
    """
    t_mean, t_log_std = teacher_mean.detach(), teacher_log_std.detach()
    if kind == "mse":
        return masked_mse(mean, t_mean, mask)
    if kind != "kl":
        raise ValueError(f"unknown distillation loss {kind!r}; choose kl or mse")
    s_mean = torch.where(mask, mean, t_mean)
    s_log_std = torch.where(mask, log_std.expand_as(mean), t_log_std)
    return gaussian_kl(t_mean, t_log_std, s_mean, s_log_std)


@torch.no_grad()
def specialist_gaussian(specialist, states: Tensor) -> tuple[Tensor, Tensor]:
    """A residual specialist's action Gaussian at states (B, Ds) (no history: the base reads one state)
    -> (mean (B, Da) clipped to the action bounds, std (B, Da)) in env units."""
    states = states.to(specialist.device, torch.float32)
    base_action = specialist.base.predict_action_chunk({"state": states[:, None]})[:, 0]
    flat = torch.cat([states.repeat(1, specialist.config.obs_horizon), base_action], dim=-1)
    mean, log_std, _ = specialist.actor_critic(flat)
    scale = specialist.config.residual_scale
    return specialist.combine(base_action, flat), (scale * log_std.exp()).expand_as(mean)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write an ``.npz`` atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def append_npz(data: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """Append the rows of a ``save_npz`` file keyed ``"<robot>/<field>"`` to ``data[robot][field]``."""
    with np.load(path) as z:
        for key in z.files:
            name, field = key.split("/")
            have = data.setdefault(name, {})
            have[field] = np.concatenate([have[field], z[key]]) if field in have else z[key]


# ---------------------------------------------------------------------------- stage 1: IL base
def load_demos(cfg: DictConfig, ccfg: CompassConfig) -> dict[str, dict[str, np.ndarray]]:
    """Collect (or reuse) each embodiment's demos (``demos``, else ``demos_per_embodiment``)
    -> {name: {"state", "action"}}."""
    out = {}
    for emb in ccfg.embodiments:
        path, (std, prob) = demo_path(cfg, emb), emb.demo_noise(cfg.demos)
        n = emb.demo_count(ccfg.demos_per_embodiment)
        summary = make_runner(cfg, emb).collect_demos(
            path, n, seed_start=int(cfg.demos.seed_start), num_workers=int(cfg.demos.num_workers),
            noise_std=std, noise_prob=prob)
        store = EpisodeStore(path, mode="r")
        ends = store.episode_ends[:n]
        if int(store.episode_meta("seed")[: len(ends)].max()) >= int(cfg.eval.seed_start):
            raise ValueError(f"{emb.name} demo seeds reach eval.seed_start")
        out[emb.name] = {k: v[: ends[-1]] for k, v in store.load(["state", "action"]).items()}
        print(f"[compass] {emb.name}: {len(ends)} demos, {ends[-1]} steps from {path} ({summary})")
    return out


def build_policy_from(ccfg: CompassConfig, dims: dict[str, tuple[int, int]], normalizer: Normalizer):
    from embodied_distill.policies.compass.modeling_compass import CompassPolicy, CompassPolicyConfig

    embodiments = [{"name": e.name, "obs_dim": dims[e.name][0], "action_dim": dims[e.name][1],
                    "action_relative_to_state": e.action_relative_to_state} for e in ccfg.embodiments]
    return CompassPolicy(CompassPolicyConfig(embodiments=embodiments, **ccfg.policy), normalizer)


def train_base(cfg: DictConfig, ccfg: CompassConfig, out: Path, device: torch.device):
    """One BC base on every robot's demos; then, for robots with ``base_dagger_rounds``, DAgger rounds
    (the base acts, the scripted expert labels, refit on everything so far). Each round's rows
    (``dagger<k>.npz``) and fit (``round<k>/``) are kept, so an interrupted stage resumes."""
    ckpt = out / "checkpoint"
    if (ckpt / "meta.json").exists():
        return load_policy(ckpt)[0]
    data = load_demos(cfg, ccfg)
    dims = {n: (v["state"].shape[-1], v["action"].shape[-1]) for n, v in data.items()}
    relative = {e.name: e.action_relative_to_state for e in ccfg.embodiments}
    stats = {}
    for name, v in data.items():  # the normaliser comes from the demos alone and stays fixed
        stats[f"state/{name}"] = v["state"]
        stats[f"action/{name}"] = v["action"] - (v["state"][:, : dims[name][1]] if relative[name] else 0.0)
    normalizer = Normalizer.fit(stats, mode="limits", eps=0.01)
    rounds = max(e.base_dagger_rounds for e in ccfg.embodiments)
    policy, meta = None, {"stage": "base", "dims": dims}
    for k in range(rounds + 1):
        if k > 0:
            path = out / f"dagger{k}.npz"
            if not path.exists():
                rows = {}
                for emb in ccfg.embodiments:
                    if emb.base_dagger_rounds < k:
                        continue
                    rec = make_runner(cfg, emb).label_rollouts(
                        policy.as_embodiment(emb.name).eval(), emb.base_dagger_episodes,
                        3_000_000 + 100_000 * k + 10_000 * int(cfg.seed))
                    print(f"[compass] base DAgger round {k}, {emb.name}: the base succeeded in "
                          f"{rec['successes']}/{emb.base_dagger_episodes} episodes; {len(rec['state'])} "
                          "expert-labelled rows")
                    rows.update({f"{emb.name}/state": rec["state"], f"{emb.name}/action": rec["action"]})
                save_npz(path, **rows)
            append_npz(data, path)
            meta[f"dagger{k}_rows"] = {e.name: len(data[e.name]["state"]) for e in ccfg.embodiments}
        policy = fit_base(cfg, ccfg, data, dims, normalizer, out if rounds == 0 else out / f"round{k}",
                          device, meta)
    if not rounds:  # fit_base saved it at ckpt already
        return policy
    return load_policy(policy.save_pretrained(ckpt, OmegaConf.to_container(cfg, resolve=True), meta=meta))[0]


def fit_base(cfg: DictConfig, ccfg: CompassConfig, data: dict[str, dict[str, np.ndarray]],
             dims: dict[str, tuple[int, int]], normalizer: Normalizer, out: Path, device: torch.device,
             meta: dict[str, Any]):
    """BC (``base_steps``, from scratch) on ``data`` {name: {"state", "action"}} in env units;
    resumable in ``out/train_state``; the fitted base is saved in ``out/checkpoint`` and returned."""
    if (out / "checkpoint" / "meta.json").exists():
        return load_policy(out / "checkpoint")[0]
    torch.manual_seed(int(cfg.seed))
    policy = build_policy_from(ccfg, dims, normalizer).to(device)
    parts = []
    for i, (name, d) in enumerate(data.items()):
        parts.append({"embodiment": torch.full((len(d["state"]),), i),
                      "state": policy.normalize_state(name, torch.as_tensor(d["state"])).cpu(),
                      "action": policy.normalize_action(name, torch.as_tensor(d["action"]),
                                                        torch.as_tensor(d["state"])).cpu()})
    gen, logger = torch.Generator().manual_seed(int(cfg.seed)), MetricLogger(out)
    step = train_phase("compass_base", policy, policy.compute_loss, ccfg.base_steps, phase_cfg(cfg, ccfg),
                       BalancedData(parts), gen, out / "train_state", logger, device)
    logger.close()
    return load_policy(policy.save_pretrained(out / "checkpoint", OmegaConf.to_container(cfg, resolve=True),
                                              meta={**meta, "step": step}))[0]


# ---------------------------------------------------------------------------- stage 2: specialists
def train_specialists(cfg: DictConfig, ccfg: CompassConfig, base, out: Path, device: torch.device) -> None:
    from embodied_distill.distill.residual_rl import train_residual

    rcfg = RPDConfig.from_cfg({**ccfg.specialist, "name": "residual_rl", "distill_coef": 0.0})
    for emb in ccfg.embodiments:
        run = out / emb.name
        if (ccfg.only and emb.name not in ccfg.only) or (run / "report.json").exists():
            continue
        scfg = OmegaConf.merge(cfg, {"eval": {"video_episodes": 0}})
        scfg.task = OmegaConf.create(embodiment_task(cfg, emb))  # saved with the checkpoint: its own robot
        own = rcfg if emb.residual_scale is None else \
            dataclasses.replace(rcfg, residual_scale=emb.residual_scale)
        train_residual(scfg, run, make_runner(cfg, emb), device, own, base.as_embodiment(emb.name).eval(),
                       history=own.net_obs_horizon, tag=f"compass_{emb.name}")


def load_specialist(out: Path, name: str):
    ckpt = out / name / "checkpoint"
    if not (ckpt / "meta.json").exists():
        raise FileNotFoundError(f"no specialist for {name} at {ckpt}: run the specialists stage first")
    return load_policy(ckpt)[0]


# ---------------------------------------------------------------------------- stage 3: generalist
@torch.no_grad()
def record(runner, actor, specialist, episodes: int, seed_start: int, num_envs: int, sample: bool,
           rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Roll out ``actor`` (None: the specialist itself) on ``runner``'s robot and record the states with
    the specialist's Gaussian there -> {"state" (N, Ds), "mean" (N, Da), "std" (N, Da)} in env units."""
    venv = runner.make_vec_env(num_envs=min(num_envs, episodes))
    rows: dict[str, list[np.ndarray]] = {"state": [], "mean": [], "std": []}
    try:
        for start in range(0, episodes, venv.num_envs):
            obs = venv.reset([seed_start + start + i for i in range(venv.num_envs)])
            if actor is not None:
                actor.reset()
            keep = min(venv.num_envs, episodes - start)
            for _ in range(runner.max_episode_steps):
                mean, std = specialist_gaussian(specialist, torch.from_numpy(obs))
                mean, std = mean.cpu().numpy(), std.cpu().numpy()
                for k, v in (("state", obs), ("mean", mean), ("std", std)):
                    rows[k].append(v[:keep])
                if actor is not None:
                    action = actor.select_action({"state": torch.from_numpy(obs)}).cpu().numpy()
                elif sample:
                    action = mean + std * rng.standard_normal(mean.shape)
                else:
                    action = mean
                obs, _, _ = venv.step(np.clip(action, venv.action_low, venv.action_high))
    finally:
        venv.close()
    return {k: np.concatenate(v).astype(np.float32) for k, v in rows.items()}


@torch.no_grad()
def perturbed_rows(specialist, policy, name: str, rows: dict[str, np.ndarray], copies: int, noise: float,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``copies`` Gaussian perturbations of every recorded state of robot ``name`` (std ``noise`` x each
    feature's normalisation spread ``1 / scale`` of ``policy``'s normaliser), labelled with the specialist's
    Gaussian there: ``rows["state"]`` (N, Ds) -> {"state" (copies * N, Ds), "mean", "std" (copies * N, Da)}
    in env units, like :func:`record`'s."""
    spread = 1.0 / policy.normalizer.params[f"state/{name}"]["scale"].cpu().numpy()
    states = np.repeat(rows["state"], copies, axis=0)
    states = (states + noise * spread * rng.standard_normal(states.shape)).astype(np.float32)
    mean, std = specialist_gaussian(specialist, torch.from_numpy(states))  # one batch: small MLPs, ~1e5 rows
    return {"state": states, "mean": mean.cpu().numpy(), "std": std.cpu().numpy()}


def distill_data(policy, ccfg: CompassConfig, data: dict[str, dict[str, np.ndarray]]) -> BalancedData:
    """Recorded env-unit rows -> normalised padded rows (teacher log-std in normalised units, floored)."""
    parts = []
    for name, d in data.items():
        idx = policy.config.index(name)
        scale = policy.normalizer.params[f"action/{name}"]["scale"]
        log_std = (torch.as_tensor(d["std"]) * scale).clamp_min(ccfg.teacher_min_std).log()
        parts.append({"embodiment": torch.full((len(d["state"]),), idx),
                      "state": policy.normalize_state(name, torch.as_tensor(d["state"])).cpu(),
                      "teacher_mean": policy.normalize_action(name, torch.as_tensor(d["mean"]),
                                                              torch.as_tensor(d["state"])).cpu(),
                      "teacher_log_std": pad_features(log_std, policy.config.max_action_dim).cpu()})
    return BalancedData(parts)


def fit_generalist(cfg: DictConfig, ccfg: CompassConfig, base, start, data: dict[str, dict[str, np.ndarray]],
                   out: Path, device: torch.device):
    """One distillation fit of ``epochs`` passes over ``data``, from ``start``'s weights (None: fresh, or
    the base with ``init_generalist_from_base``); resumable; returns the fitted policy (checkpoint in out)."""
    if (out / "checkpoint" / "meta.json").exists():
        return load_policy(out / "checkpoint")[0]
    torch.manual_seed(int(cfg.seed) + 1)
    # same interface and normaliser as the base; the std layout is the generalist's own setting (the
    # base never used its std, and may come from a run with the other layout)
    per_robot = bool(ccfg.policy.get("std_per_embodiment", False))
    policy = type(base)(dataclasses.replace(base.config, std_per_embodiment=per_robot), base.normalizer)
    if start is not None or ccfg.init_generalist_from_base:
        weights = dict((start if start is not None else base).state_dict())
        src = weights["log_std"]
        if src.dim() > policy.log_std.dim():  # per-robot rows -> one global std: their mean
            src = src.mean(0)
        weights["log_std"] = src.expand_as(policy.log_std).clone()  # a global std seeds every row
        policy.load_state_dict(weights)
    policy.to(device)
    dataset = distill_data(policy, ccfg, data)
    pcfg = phase_cfg(cfg, ccfg)
    steps = max(1, int(np.ceil(ccfg.epochs * len(dataset) / int(pcfg.distill.batch_size))))

    def loss_fn(batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        emb = batch["embodiment"]
        mean, log_std = policy.distribution(batch["state"], emb)
        loss = generalist_loss(ccfg.distill_loss, mean, log_std, batch["teacher_mean"],
                               batch["teacher_log_std"], policy.action_mask(emb))
        return loss, {"loss": float(loss.detach())}

    gen, logger = torch.Generator().manual_seed(int(cfg.seed) + 2), MetricLogger(out)
    step = train_phase(f"compass_{out.name}", policy, loss_fn, steps, pcfg, dataset, gen, out / "train_state",
                       logger, device)
    logger.close()
    policy.save_pretrained(out / "checkpoint", OmegaConf.to_container(cfg, resolve=True),
                           meta={"step": step, "stage": "generalist", "rows": {n: len(d["state"])
                                                                               for n, d in data.items()}})
    return policy.eval()


def train_generalist(cfg: DictConfig, ccfg: CompassConfig, base, spec_dir: Path, out: Path,
                     device: torch.device):
    """Record the specialists (round 0) and the generalist under the specialists' labels (DAgger rounds
    1..dagger_rounds), refitting on everything recorded so far after each round."""
    final = out / "checkpoint"
    if (final / "meta.json").exists():
        return load_policy(final)[0]
    specialists = {e.name: load_specialist(spec_dir, e.name).eval() for e in ccfg.embodiments}
    data: dict[str, dict[str, np.ndarray]] = {}
    policy = None
    for k in range(ccfg.dagger_rounds + 1):
        path = out / f"data_round{k}.npz"
        if not path.exists():
            rng = np.random.default_rng(int(cfg.seed) + 100 + k)
            rows = {}
            for emb in ccfg.embodiments:
                actor = None if k == 0 else policy.as_embodiment(emb.name).eval()
                rec = record(make_runner(cfg, emb), actor, specialists[emb.name],
                             ccfg.data_episodes if k == 0 else ccfg.dagger_episodes,
                             2_000_000 + 100_000 * k + 10_000 * int(cfg.seed), int(cfg.eval.num_envs),
                             ccfg.data_action == "sample", rng)
                rows.update({f"{emb.name}/{key}": v for key, v in rec.items()})
            save_npz(path, **rows)
        append_npz(data, path)
        fit_on = data
        if ccfg.state_noise_copies:  # drawn again each round, over everything recorded so far
            rng = np.random.default_rng(int(cfg.seed) + 200 + k)
            fit_on = {}
            for name, d in data.items():
                extra = perturbed_rows(specialists[name], base, name, d, ccfg.state_noise_copies,
                                       ccfg.state_noise, rng)
                fit_on[name] = {f: np.concatenate([d[f], extra[f]]) for f in d}
        sizes = ", ".join(f"{n} {len(d['state'])}" for n, d in fit_on.items())
        print(f"[compass] round {k}: distilling on {sizes} rows"
              + (f" ({ccfg.state_noise_copies} perturbed copies each)" if ccfg.state_noise_copies else ""))
        policy = fit_generalist(cfg, ccfg, base, policy, fit_on, out / f"round{k}", device)
    policy.save_pretrained(final, OmegaConf.to_container(cfg, resolve=True),
                           meta={"stage": "generalist", "dagger_rounds": ccfg.dagger_rounds})
    return policy


# ---------------------------------------------------------------------------- stage 4: evaluation
def evaluate_all(cfg: DictConfig, ccfg: CompassConfig, run_dir: Path) -> dict[str, Any]:
    """Success of base / specialist / generalist on every embodiment, on the same unseen seeds
    (``eval.seed_start``, ``eval.episodes``). Policies not trained yet are skipped (listed in
    ``missing``). Each evaluation is cached in ``eval/<policy>_<embodiment>.json`` and reused on the same
    seeds only; a specialist's own final evaluation (``specialists/<name>/report.json``) is reused when it
    ran on the same seeds."""
    from embodied_distill.sim.evaluation import summarize

    episodes, seed_start = int(cfg.eval.episodes), int(cfg.eval.seed_start)
    seeds = list(range(seed_start, seed_start + episodes))
    ckpts = {"base": run_dir / "base" / "checkpoint", "generalist": run_dir / "generalist" / "checkpoint"}
    shared = {w: load_policy(p)[0] for w, p in ckpts.items() if (p / "meta.json").exists()}
    table: dict[str, dict[str, Any]] = {}
    missing, generalist_episodes = [], []
    for emb in ccfg.embodiments:
        runner, table[emb.name] = make_runner(cfg, emb), {}
        for who in ("base", "specialist", "generalist"):
            path, spec_dir = run_dir / "eval" / f"{who}_{emb.name}.json", run_dir / "specialists" / emb.name
            own = json.loads((spec_dir / "report.json").read_text()) \
                if who == "specialist" and (spec_dir / "report.json").exists() else None
            rep = json.loads(path.read_text()) if path.exists() else None
            if rep is None or rep.get("seeds") != seeds:  # not cached, or cached on other seeds
                rep = own if own is not None and own.get("seeds") == seeds else None
                trained = (spec_dir / "checkpoint").exists() if who == "specialist" else who in shared
                if rep is None and not trained:
                    missing.append(f"{who}/{emb.name}")
                    continue
                if rep is None:
                    policy = (load_specialist(run_dir / "specialists", emb.name) if who == "specialist"
                              else shared[who].as_embodiment(emb.name))
                    rep = runner.evaluate(policy.eval(), episodes, seed_start,
                                          num_envs=int(cfg.eval.num_envs))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(rep))
            keys = ("success_rate", "success_once_rate", "success_stderr", "episodes", "mean_return",
                    "selected_step", "env_steps")  # a specialist's kept weights (keep_best), its run's steps
            if own is not None:  # evaluated here on other seeds than its own report's: still that run
                for k in ("selected_step", "env_steps"):
                    rep.setdefault(k, own.get(k))
            table[emb.name][who] = {k: rep[k] for k in keys if rep.get(k) is not None}
            if who == "generalist":
                generalist_episodes += rep["per_episode"]
        print(f"[compass] {emb.name}: " + ", ".join(f"{w} {r['success_rate']:.2f}"
                                                    for w, r in table[emb.name].items()))
    mean = {w: float(np.mean([table[e][w]["success_rate"] for e in table])) for w in
            ("base", "specialist", "generalist") if all(w in table[e] for e in table)}
    targets = {}
    if len(mean) == 3:
        targets = {"generalist_ge_90pct_of_specialist": {
            e: (table[e]["generalist"]["success_rate"] >= 0.9 * table[e]["specialist"]["success_rate"])
            if table[e]["specialist"]["success_rate"] > 0 else "vacuous: the specialist has 0 success"
            for e in table},
                   "generalist_ge_2x_base_mean": mean["generalist"] >= 2 * mean["base"]}
    report = summarize(generalist_episodes, []) if generalist_episodes else {}
    report.update(task=cfg.task.name, env_id=cfg.task.env_id, control_mode="per embodiment", num_envs=int(
        cfg.eval.num_envs), max_episode_steps=max(e.max_episode_steps for e in ccfg.embodiments),
        per_embodiment=table, mean_success=mean, targets=targets, missing=missing, method="compass",
        embodiments=[dataclasses.asdict(e) for e in ccfg.embodiments])
    return report


# ---------------------------------------------------------------------------- the method
def run(cfg: DictConfig, run_dir: Path, runner, device: torch.device) -> dict[str, Any] | None:
    ccfg = CompassConfig.from_cfg(cfg.distill)
    if not hasattr(runner, "env_cfg"):
        raise ValueError("compass needs a ManiSkill or navigation task (sim=maniskill or sim=navigation)")
    print(f"[compass] embodiments {[e.name for e in ccfg.embodiments]}, stages {list(ccfg.stages)}")
    run_dir = Path(run_dir)
    if "base" in ccfg.stages or any(s in ccfg.stages for s in ("specialists", "generalist")):
        base = train_base(cfg, ccfg, run_dir / "base", device)
    if "specialists" in ccfg.stages:
        train_specialists(cfg, ccfg, base, run_dir / "specialists", device)
    if "generalist" in ccfg.stages:
        train_generalist(cfg, ccfg, base, run_dir / "specialists", run_dir / "generalist", device)
    if "evaluate" not in ccfg.stages:
        return None
    report = evaluate_all(cfg, ccfg, run_dir)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    if report["missing"]:
        print(f"[compass] not trained yet, not evaluated: {report['missing']}")
        return None
    return report
