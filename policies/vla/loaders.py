"""Loaders for real VLA checkpoints behind the same Teacher interface as ``VLAPolicy``.

* ``OpenVLAStyleTeacher``: an OpenVLA-style model (https://arxiv.org/abs/2406.09246) through
  ``transformers``: an image-text-to-text model whose vocabulary ends in 256 action tokens (OpenVLA
  overwrites the 256 least used Llama tokens). ``action_distribution(obs)`` decodes the Da action tokens
  autoregressively (greedy) and returns the logits over the 256 action tokens at each of them,
  ``(B, 1, Da, 256)``, ordered by ascending action value as ``ActionTokenizer(256)`` bins (OpenVLA's token
  ``vocab_size - 1 - i`` is bin ``i``). ``predict_action_chunk`` decodes with OpenVLA's own rule (bin
  ``i`` -> the centre ``min(i, 254)`` of 255 intervals of ``linspace(-1, 1, 256)``) and de-normalises with
  the checkpoint's ``norm_stats`` (q01/q99 per dimension, a mask of dimensions left as they are).
  Real OpenVLA checkpoints need ``trust_remote_code=True`` (their classes ship with the weights).
* ``LeRobotTeacher``: lerobot's flow-matching VLAs (SmolVLA, pi0) when ``lerobot`` is installed; they
  produce continuous action chunks (no token distribution), de-normalised by lerobot's own
  post-processor.

Both read the observation dicts of the LIBERO-style runner: images ``(B, To, [V,] H, W, 3)`` uint8,
``state`` ``(B, To, Ds)`` and ``instruction`` (B strings); the last step (and one view per camera) is used.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from embodied_distill.policies.base import ChunkExecutor
from embodied_distill.policies.vla.modeling_vla import as_views, instruction_list
from embodied_distill.policies.vla.tokenizer import sample_tokens
from torch import Tensor, nn

OPENVLA_PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
"""OpenVLA's prompt (the instruction is lower-cased)."""


@dataclasses.dataclass
class ExternalVLAConfig:
    """The Policy-shaped description of a loaded VLA that the policy server and evaluation read."""

    obs_keys: tuple[str, ...]
    """Observation keys read (image keys, optional "state", "instruction")."""
    action_dim: int
    """Da."""
    action_horizon: int = 1
    """Ta: actions per prediction (OpenVLA: 1; SmolVLA / pi0: their chunk size)."""
    n_action_steps: int = 1
    """Actions executed per prediction by ``select_action``."""
    obs_horizon: int = 1
    """To (the loaders use the last observation)."""
    obs_dim: int = 0
    """State size (0: not read)."""


def last_image(obs: Mapping[str, Any], key: str, view: int) -> np.ndarray:
    """``obs[key]`` (B, To, [V,] ...) -> (B, H, W, 3) uint8 of the last step's camera ``view``."""
    x = torch.as_tensor(obs[key])
    img = as_views(x, x.shape[2] if x.ndim == 6 else 1)[:, -1, view].permute(0, 2, 3, 1)  # (B, H, W, 3)
    return (img * 255).round().clamp(0, 255).to(torch.uint8).numpy()


class _ChunkQueue:
    """``select_action`` over ``predict_action_chunk`` with a history of one step (the loaders' To)."""

    config: ExternalVLAConfig

    def reset(self) -> None:
        self._exec = ChunkExecutor(1, self.config.n_action_steps)

    @torch.no_grad()
    def select_action(self, obs: Mapping[str, Any]) -> Tensor:
        """``{key: (B, ...)}`` for the current step -> (B, Da)."""
        if getattr(self, "_exec", None) is None:
            self.reset()
        return self._exec.next_action(lambda: self.predict_action_chunk(
            {k: v if k == "instruction" else torch.as_tensor(v).unsqueeze(1)  # add To = 1
             for k, v in obs.items()}))


# ------------------------------------------------------------------------------------------ OpenVLA-style
class OpenVLAStyleTeacher(_ChunkQueue, nn.Module):
    """An OpenVLA-style token VLA from ``transformers``.

    Args:
        model: an image-text-to-text model: ``model(input_ids, attention_mask, pixel_values).logits``.
        processor: its processor: ``processor(text=..., images=..., return_tensors="pt")``.
        action_dim: Da (OpenVLA: 7).
        norm_stats: ``{"q01": [Da], "q99": [Da], "mask": [Da] (optional)}`` (OpenVLA's
            ``norm_stats[unnorm_key]["action"]``); None leaves actions normalised in [-1, 1].
        vocab_size: the tokenizer's base vocabulary size; the action tokens are its last ``n_bins`` ids
            (default: the processor's ``tokenizer.vocab_size``).
        n_bins: action tokens (OpenVLA: 256).
        prompt: format string with ``{instruction}``; an image placeholder the processor needs (e.g.
            ``"<image>"``) goes in front via ``image_prefix``.
        image_key, view: which observation image (and camera) the model sees.
    """

    name = "openvla_style"

    def __init__(self, model: nn.Module, processor: Any, action_dim: int = 7,
                 norm_stats: Mapping[str, Sequence[float]] | None = None, vocab_size: int | None = None,
                 n_bins: int = 256, prompt: str = OPENVLA_PROMPT, image_prefix: str = "",
                 image_key: str = "rgb", view: int = 0):
        super().__init__()
        self.model, self.processor = model.eval(), processor
        self.vocab_size = int(vocab_size or processor.tokenizer.vocab_size)
        if not 0 < n_bins <= self.vocab_size:
            raise ValueError(f"n_bins={n_bins} must be in [1, vocab_size={self.vocab_size}]")
        self.n_bins, self.prompt, self.image_prefix = int(n_bins), prompt, image_prefix
        self.image_key, self.view = image_key, int(view)
        self.config = ExternalVLAConfig(obs_keys=(image_key, "instruction"), action_dim=int(action_dim))
        edges = np.linspace(-1.0, 1.0, self.n_bins)
        self.register_buffer("centres", torch.as_tensor((edges[:-1] + edges[1:]) / 2, dtype=torch.float32),
                             persistent=False)
        self.norm_stats = None
        if norm_stats is not None:
            q01, q99 = (torch.as_tensor(norm_stats[k], dtype=torch.float32) for k in ("q01", "q99"))
            mask = torch.as_tensor(norm_stats.get("mask", [True] * len(q01)), dtype=torch.bool)
            if not q01.shape == q99.shape == mask.shape == (action_dim,):
                raise ValueError(f"norm_stats q01/q99/mask must each have action_dim={action_dim} entries")
            self.norm_stats = (q01, q99, mask)
        self.reset()

    @classmethod
    def from_pretrained(cls, path: str | Path, *, unnorm_key: str | None = None,
                        norm_stats: Mapping[str, Sequence[float]] | None = None,
                        trust_remote_code: bool = False, **kwargs: Any) -> OpenVLAStyleTeacher:
        """Load ``path`` (a local directory) with ``AutoModelForImageTextToText`` (or
        ``AutoModelForVision2Seq`` for remote-code models such as OpenVLA) and ``AutoProcessor``.

        Action statistics: ``norm_stats`` if given, else ``model.config.norm_stats[unnorm_key]["action"]``
        (OpenVLA), else ``<path>/dataset_statistics.json`` the same way.
        """
        import transformers

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no VLA checkpoint directory at {path} (hub downloads are not used)")
        auto = getattr(transformers, "AutoModelForImageTextToText", None)
        try:
            model = auto.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (ValueError, AttributeError, TypeError):
            model = transformers.AutoModelForVision2Seq.from_pretrained(str(path),
                                                                        trust_remote_code=trust_remote_code)
        processor = transformers.AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        if norm_stats is None:
            stats = getattr(model.config, "norm_stats", None)
            if stats is None and (path / "dataset_statistics.json").exists():
                stats = json.loads((path / "dataset_statistics.json").read_text())
            if stats is not None:
                if unnorm_key is None:
                    if len(stats) != 1:
                        raise ValueError(f"the checkpoint has statistics of {sorted(stats)}; pass unnorm_key")
                    unnorm_key = next(iter(stats))
                if unnorm_key not in stats:
                    raise KeyError(f"unnorm_key {unnorm_key!r} not in the checkpoint's {sorted(stats)}")
                norm_stats = stats[unnorm_key]["action"]
        action_dim = kwargs.pop("action_dim", None) or (len(norm_stats["q01"]) if norm_stats else 7)
        return cls(model, processor, action_dim=action_dim, norm_stats=norm_stats, **kwargs)

    # ------------------------------------------------------------------ decoding
    def _inputs(self, image: np.ndarray, instruction: str) -> dict[str, Tensor]:
        text = self.image_prefix + self.prompt.format(instruction=instruction.lower())
        enc = self.processor(text=text, images=image, return_tensors="pt")
        keep = ("input_ids", "attention_mask", "pixel_values", "image_sizes")
        return {k: v for k, v in enc.items() if k in keep}

    def _action_logits(self, inputs: dict[str, Tensor], tokens: list[int]) -> Tensor:
        """Logits (n_bins,) over the action tokens for the next position, bins in ascending order."""
        ids = torch.cat([inputs["input_ids"], torch.tensor([tokens], dtype=torch.long)], dim=1)
        mask = torch.ones_like(ids)
        logits = self.model(**{**inputs, "input_ids": ids, "attention_mask": mask}).logits[0, -1]
        block = logits[self.vocab_size - self.n_bins: self.vocab_size].float()
        return block.flip(0)  # token vocab_size - 1 - i is bin i

    def _decode(self, obs: Mapping[str, Any], temperature: float, generator: torch.Generator | None
                ) -> tuple[Tensor, Tensor]:
        images = last_image(obs, self.image_key, self.view)
        texts = instruction_list(obs["instruction"], len(images))
        all_logits, all_bins = [], []
        for image, text in zip(images, texts):
            inputs = self._inputs(image, text)
            tokens, per_dim, bins = [], [], []
            for _ in range(self.config.action_dim):
                logits = self._action_logits(inputs, tokens)
                b = int(sample_tokens(logits, temperature, generator))
                per_dim.append(logits)
                bins.append(b)
                tokens.append(self.vocab_size - 1 - b)
            all_logits.append(torch.stack(per_dim))
            all_bins.append(bins)
        return torch.stack(all_logits)[:, None], torch.tensor(all_bins)[:, None]

    def action_distribution(self, obs: Mapping[str, Any]) -> Tensor:
        """Observation dict -> (B, 1, Da, n_bins) logits along the greedy token path."""
        return self._decode(obs, 0.0, None)[0]

    @torch.no_grad()
    def predict_action_chunk(self, obs: Mapping[str, Any], temperature: float = 0.0,
                             generator: torch.Generator | None = None) -> Tensor:
        """Observation dict -> (B, 1, Da) actions (de-normalised when ``norm_stats`` is set)."""
        bins = self._decode(obs, temperature, generator)[1]
        normalized = self.centres[bins.clamp_max(self.n_bins - 2)]
        return self.unnormalize(normalized)

    def unnormalize(self, normalized: Tensor) -> Tensor:
        """(..., Da) in [-1, 1] -> data units: ``0.5 (x + 1) (q99 - q01) + q01`` on masked dimensions."""
        if self.norm_stats is None:
            return normalized
        q01, q99, mask = self.norm_stats
        return torch.where(mask, 0.5 * (normalized + 1) * (q99 - q01) + q01, normalized)


# ------------------------------------------------------------------------------------------ lerobot
LEROBOT_POLICIES = {
    "smolvla": ("lerobot.policies.smolvla.modeling_smolvla", "SmolVLAPolicy"),
    "pi0": ("lerobot.policies.pi0.modeling_pi0", "PI0Policy"),
}


def lerobot_policy_class(kind: str):
    """lerobot's policy class for ``kind`` (``smolvla`` or ``pi0``); a clear error without lerobot."""
    if kind not in LEROBOT_POLICIES:
        raise ValueError(f"unknown lerobot VLA {kind!r}; available: {sorted(LEROBOT_POLICIES)}")
    module, cls = LEROBOT_POLICIES[kind]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise ImportError(f"loading a {kind} checkpoint needs lerobot (pip install 'lerobot[{kind}]'); "
                          f"import failed: {e}") from e


class LeRobotTeacher(_ChunkQueue, nn.Module):
    """lerobot's SmolVLA / pi0 behind the Teacher interface (continuous chunks, no token logits).

    Args:
        policy: a lerobot ``PreTrainedPolicy`` with ``predict_action_chunk(batch) -> (B, Ta, Da)``.
        cameras: lerobot image feature name -> (observation key, view), e.g.
            ``{"observation.images.image": ("rgb", 0), "observation.images.wrist_image": ("rgb", 1)}``.
        preprocess, postprocess: lerobot's processor pipelines (normalisation in, de-normalisation out);
            None for lerobot versions whose policies normalise internally.
        n_action_steps: actions executed per chunk by ``select_action``.
    """

    name = "lerobot_vla"
    action_distribution = None  # flow matching: no categorical distribution to distil from

    def __init__(self, policy: Any, cameras: Mapping[str, tuple[str, int]], preprocess: Any = None,
                 postprocess: Any = None, n_action_steps: int = 1):
        super().__init__()
        self.policy, self.cameras = policy, dict(cameras)
        self.preprocess, self.postprocess = preprocess, postprocess
        cfg = policy.config
        action_dim = int(cfg.output_features["action"].shape[0])
        horizon = int(getattr(cfg, "chunk_size", 1))
        keys = tuple(dict.fromkeys([k for k, _ in self.cameras.values()] + ["state", "instruction"]))
        self.config = ExternalVLAConfig(obs_keys=keys, action_dim=action_dim, action_horizon=horizon,
                                        n_action_steps=min(n_action_steps, horizon))
        self.reset()

    @classmethod
    def from_pretrained(cls, path: str | Path, kind: str = "smolvla", cameras: Mapping[str, tuple[str, int]]
                        | None = None, n_action_steps: int = 1) -> LeRobotTeacher:
        policy = lerobot_policy_class(kind).from_pretrained(str(path)).eval()
        pre = post = None
        try:  # lerobot >= 0.4 keeps normalisation in processor pipelines saved with the checkpoint
            from lerobot.policies.factory import make_pre_post_processors

            pre, post = make_pre_post_processors(policy.config, pretrained_path=str(path))
        except ImportError:
            pass
        if cameras is None:
            names = [k for k in policy.config.input_features if k.startswith("observation.images.")]
            cameras = {name: ("rgb", i) for i, name in enumerate(names)}
        return cls(policy, cameras, pre, post, n_action_steps)

    @torch.no_grad()
    def predict_action_chunk(self, obs: Mapping[str, Any], temperature: float = 0.0,
                             generator: torch.Generator | None = None) -> Tensor:
        """Observation dict -> (B, Ta, Da) in data units (``temperature`` is unused: flow matching samples
        its own noise)."""
        batch: dict[str, Any] = {}
        for name, (key, view) in self.cameras.items():
            batch[name] = torch.from_numpy(last_image(obs, key, view)).permute(0, 3, 1, 2).float() / 255
        b = next(iter(batch.values())).shape[0]
        batch["observation.state"] = torch.as_tensor(obs["state"], dtype=torch.float32)[:, -1]
        batch["task"] = instruction_list(obs["instruction"], b)
        if self.preprocess is not None:
            batch = self.preprocess(batch)
        actions = self.policy.predict_action_chunk(batch)
        if self.postprocess is not None:
            actions = self.postprocess(actions)
        return torch.as_tensor(actions, dtype=torch.float32).cpu()
