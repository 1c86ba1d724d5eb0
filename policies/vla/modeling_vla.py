"""A small trainable vision-language-action model with discrete action tokens (the generalist teacher).

OpenVLA-style action tokens (https://arxiv.org/abs/2406.09246): every normalised action dimension is a
categorical over ``n_bins`` uniform bins (``ActionTokenizer``). Unlike OpenVLA's autoregressive decoding,
all ``Ta x Da`` tokens of a chunk are predicted in parallel from learned action-query tokens (as
OpenVLA-OFT's parallel decoding), which keeps inference to one forward pass on a CPU.

Tokens of the fusion transformer (width ``d_model``)::

    [instruction (1)] [state segments (To x S)] [camera views (To x K x V)] [action queries (Ta)]

* instruction: the frozen pretrained all-MiniLM-L6-v2 sentence embedding (``language.py``), optionally
  standardised per dimension (``text_norm``), projected;
* state: each ``state_split`` segment (normalised; only ``state_segments`` when set) through its own
  linear layer; with ``film_state`` each segment token is scaled/shifted by a function of the instruction;
* images: a small ResNet-style CNN with spatial-softmax keypoints (``RgbEncoder``, shared with the
  diffusion policy), one token per view and step, trained from scratch; with ``film_vision`` the
  instruction FiLMs the CNN's last feature map before the spatial softmax (RT-1,
  https://arxiv.org/abs/2212.06817), so the keypoints can find the object it names;
* action queries: the output at query ``t`` goes through a linear head to ``(Da, n_bins)`` logits.

``action_distribution(obs) -> (B, Ta, Da, n_bins)`` logits; ``predict_action_chunk(obs, temperature)``
decodes them (argmax, or sampling with a temperature) to bin centres and de-normalises to data units.
Training is token cross-entropy (``compute_loss``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from embodied_distill.policies.base import Policy
from embodied_distill.policies.diffusion.encoders import RgbEncoder
from embodied_distill.policies.vla.configuration_vla import VLAPolicyConfig
from embodied_distill.policies.vla.language import shared_encoder
from embodied_distill.policies.vla.tokenizer import ActionTokenizer, sample_tokens
from torch import Tensor, nn

from embodied_distill.data.normalizer import Normalizer
from embodied_distill.losses import masked_reduce, token_log_probs

__all__ = ["VLAPolicy", "VLAPolicyConfig", "as_views", "instruction_list"]


def as_views(images: Tensor, n_views: int) -> Tensor:
    """Image observation -> (B, To, V, 3, H, W) float in [0, 1].

    Accepts (B, To, H, W, 3) / (B, To, 3, H, W) for one view and (B, To, V, H, W, 3) /
    (B, To, V, 3, H, W) for several; uint8 (0..255) or float (0..1).
    """
    x = torch.as_tensor(images)
    if x.ndim == 5:
        x = x.unsqueeze(2)
    if x.ndim != 6:
        raise ValueError("images must be (B, To, [V,] H, W, 3) or (B, To, [V,] 3, H, W), "
                         f"got {tuple(x.shape)}")
    if x.shape[-1] == 3 and x.shape[3] != 3:
        x = x.permute(0, 1, 2, 5, 3, 4)
    if x.shape[3] != 3:
        raise ValueError(f"images need 3 colour channels, got shape {tuple(images.shape)}")
    if x.shape[2] != n_views:
        raise ValueError(f"expected {n_views} camera view(s), got images of shape {tuple(images.shape)}")
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def zero_linear(d_in: int, d_out: int) -> nn.Linear:
    """A linear layer with zero weight and bias: a FiLM generator that starts as the identity."""
    layer = nn.Linear(d_in, d_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def instruction_list(instruction: Any, batch_size: int) -> list[str]:
    """``obs["instruction"]``: a list of B strings (one string is broadcast to the batch)."""
    if isinstance(instruction, str):
        return [instruction] * batch_size
    if isinstance(instruction, Sequence) and all(isinstance(t, str) for t in instruction):
        if len(instruction) != batch_size:
            raise ValueError(f"got {len(instruction)} instructions for a batch of {batch_size}")
        return list(instruction)
    raise TypeError(f"obs['instruction'] must be a list of strings, got {type(instruction).__name__}")


class VLAPolicy(Policy):
    name = "vla"

    def __init__(self, config: VLAPolicyConfig, normalizer: Normalizer):
        super().__init__(config, normalizer)
        cfg = config
        if cfg.action_dim < 1:
            raise ValueError("action_dim must be set (>= 1) before building the policy")
        if cfg.uses_state and cfg.obs_dim < 1:
            raise ValueError("obs_dim (the state size) must be set (>= 1) when obs_keys has 'state'")
        self.tokenizer = ActionTokenizer(cfg.n_bins)
        d = cfg.d_model
        self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(), nn.Linear(d, d))
        if cfg.text_norm:
            # momentum=None: inference uses the mean of the statistics of all training batches
            self.text_norm = nn.BatchNorm1d(cfg.text_dim, affine=False, momentum=None)
        self.text_norm_frozen = False
        if cfg.text_tokens:
            self.word_proj = nn.Linear(cfg.text_dim, d)
            self.word_pos = nn.Parameter(torch.randn(cfg.text_tokens, d) * 0.02)
        n_tokens = 1
        self.state_proj = nn.ModuleList()
        if cfg.uses_state:
            split = cfg.state_split or (cfg.obs_dim,)
            if sum(split) != cfg.obs_dim:
                raise ValueError(f"state_split {split} does not sum to obs_dim={cfg.obs_dim}")
            self.state_proj.extend(nn.Linear(split[i], d) for i in cfg.state_segment_ids)
            n_tokens += cfg.obs_horizon * len(cfg.state_segment_ids)
            if cfg.film_state:  # one (scale, shift) pair of width d per read segment
                self.state_film = zero_linear(d, 2 * d * len(cfg.state_segment_ids))
        self.vision = None
        if cfg.image_keys:
            self.vision = RgbEncoder(cfg.image_size, cfg.crop_size, cfg.vision_channels, cfg.num_keypoints)
            self.vision_proj = nn.Linear(self.vision.out_dim, d)
            n_tokens += cfg.obs_horizon * len(cfg.image_keys) * cfg.n_views
            if cfg.film_vision:  # scale/shift of the last feature map, applied in front of the keypoint conv
                self.vision_film = zero_linear(d, 2 * cfg.vision_channels[-1])
                self._film: tuple[Tensor, Tensor] | None = None
                self.vision.keypoints.register_forward_pre_hook(self._film_hook)
        self.obs_pos = nn.Parameter(torch.randn(n_tokens, d) * 0.02)
        self.action_queries = nn.Parameter(torch.randn(cfg.action_horizon, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, cfg.ff_mult * d, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, cfg.action_dim * cfg.n_bins))

    def freeze_text_norm(self, statistics: Mapping[str, Tensor] | None = None) -> None:
        """Keep the instruction standardiser fixed from now on (optionally loading ``statistics``, a
        ``text_norm`` state dict, e.g. the teacher's): it stays in eval mode under ``train()``, so
        fine-tuning on a few tasks' instructions (or on batches of one) does not move the statistics
        the other tasks are read with. No-op without ``text_norm``."""
        if not self.config.text_norm:
            return
        if statistics is not None:
            self.text_norm.load_state_dict({k: v.clone() for k, v in statistics.items()})
        self.text_norm_frozen = True
        self.text_norm.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.text_norm_frozen:
            self.text_norm.eval()
        return self

    # ------------------------------------------------------------------ tokens
    def embed_instructions(self, instructions: list[str]) -> Tensor:
        """B strings -> (B, text_dim) frozen sentence embeddings on the policy's device (standardised with
        ``text_norm``)."""
        emb = shared_encoder(self.config.text_encoder).encode(instructions).to(self.device)
        return self.text_norm(emb) if self.config.text_norm else emb

    def obs_tokens(self, obs: Mapping[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Observation dict -> (B, N, d_model) tokens (instruction, state segments, views; positions added)
        and the (B, N) mask of padding tokens (True: ignore; None without word tokens).

        ``obs``: image keys (B, To, [V,] H, W, 3) or (B, To, [V,] 3, H, W); ``state`` (B, To, Ds) in data
        units; ``instruction`` list of B strings.
        """
        cfg = self.config
        batch = self._batch_size(obs)
        if "instruction" not in obs:
            raise KeyError("a VLA needs obs['instruction'] (a list of B strings)")
        texts = instruction_list(obs["instruction"], batch)
        text = self.text_proj(self.embed_instructions(texts))  # (B, d)
        tokens = [text.unsqueeze(1)]
        if cfg.uses_state:
            state = torch.as_tensor(obs["state"]).to(self.device, torch.float32)
            state = self.normalizer.normalize("state", state)
            self._check_time(state, "state")
            parts = state.split(cfg.state_split or (cfg.obs_dim,), dim=-1)
            segs = torch.stack([p(parts[i]) for p, i in zip(self.state_proj, cfg.state_segment_ids)],
                               dim=2)  # (B, To, S, d)
            if cfg.film_state:
                scale, shift = self.state_film(text).view(batch, 1, -1, 2, cfg.d_model).unbind(3)
                segs = segs * (1 + scale) + shift
            tokens.append(segs.flatten(1, 2))
        for key in cfg.image_keys:
            views = as_views(obs[key], cfg.n_views).to(self.device)  # (B, To, V, 3, H, W)
            self._check_time(views, key)
            flat = views.flatten(0, 2)
            if flat.shape[-1] != cfg.image_size or flat.shape[-2] != cfg.image_size:
                flat = F.interpolate(flat, size=(cfg.image_size, cfg.image_size), mode="area")
            feats = self.vision_proj(self.vision_features(flat, text))  # (B * To * V, d)
            tokens.append(feats.view(batch, -1, cfg.d_model))
        x = torch.cat(tokens, dim=1) + self.obs_pos
        if not cfg.text_tokens:
            return x, None
        hidden, valid = shared_encoder(cfg.text_encoder).encode_tokens(texts, cfg.text_tokens)
        words = self.word_proj(hidden.to(self.device)) + self.word_pos
        pad = torch.cat([~valid, torch.zeros(batch, x.shape[1], dtype=torch.bool)], dim=1).to(self.device)
        return torch.cat([words, x], dim=1), pad

    def vision_features(self, images: Tensor, text: Tensor) -> Tensor:
        """(N, 3, S, S) images of N = B * k views (k = To * V, grouped per batch row) and the (B, d) projected
        instruction -> (N, 2 * num_keypoints) keypoints; with ``film_vision`` the instruction scales and
        shifts the CNN's last feature map before the spatial softmax."""
        if not self.config.film_vision:
            return self.vision(images)
        per_row = images.shape[0] // text.shape[0]
        scale, shift = self.vision_film(text).repeat_interleave(per_row, dim=0).chunk(2, dim=-1)
        self._film = (scale, shift)
        try:
            return self.vision(images)
        finally:
            self._film = None

    def _film_hook(self, module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Forward pre-hook of the keypoint conv: FiLM its (N, C, h, w) input with ``self._film``."""
        if self._film is None:
            raise RuntimeError("film_vision: run the vision encoder through vision_features(images, text)")
        scale, shift = self._film
        return (args[0] * (1 + scale[:, :, None, None]) + shift[:, :, None, None],)

    def _batch_size(self, obs: Mapping[str, Any]) -> int:
        for key in self.config.obs_keys:
            if key != "instruction" and key in obs:
                return int(torch.as_tensor(obs[key]).shape[0])
        return len(instruction_list(obs.get("instruction"), len(obs.get("instruction") or [])))

    def _check_time(self, x: Tensor, key: str) -> None:
        if x.ndim < 3 or x.shape[1] != self.config.obs_horizon:
            raise ValueError(f"obs[{key!r}] has shape {tuple(x.shape)}; expected "
                             f"(B, To={self.config.obs_horizon}, ...)")

    # ------------------------------------------------------------------ the distribution
    def action_distribution(self, obs: Mapping[str, Any]) -> Tensor:
        """Observation dict -> (B, Ta, Da, n_bins) logits over normalised-action bins (differentiable)."""
        cfg = self.config
        x, pad = self.obs_tokens(obs)
        queries = self.action_queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        if pad is not None:
            pad = torch.cat([pad, torch.zeros(x.shape[0], cfg.action_horizon, dtype=torch.bool,
                                              device=pad.device)], dim=1)
        h = self.transformer(torch.cat([x, queries], dim=1), src_key_padding_mask=pad)
        h = h[:, -cfg.action_horizon:]
        return self.head(h).view(x.shape[0], cfg.action_horizon, cfg.action_dim, cfg.n_bins)

    def decode_logits(self, logits: Tensor, temperature: float = 0.0,
                      generator: torch.Generator | None = None) -> Tensor:
        """(B, Ta, Da, n_bins) logits -> (B, Ta, Da) actions in data units (argmax at temperature 0,
        otherwise a sample of ``softmax(logits / temperature)`` per dimension)."""
        tokens = sample_tokens(logits, temperature, generator)
        return self.normalizer.unnormalize("action", self.tokenizer.decode(tokens))

    @torch.no_grad()
    def predict_action_chunk(self, obs: Mapping[str, Any], temperature: float = 0.0,
                             generator: torch.Generator | None = None) -> Tensor:
        """Observation dict -> (B, Ta, Da) actions in data units."""
        return self.decode_logits(self.action_distribution(obs), temperature, generator)

    @torch.no_grad()
    def select_action(self, obs: Mapping[str, Any]) -> Tensor:
        """``{image keys: (B, ...), "state": (B, Ds), "instruction": [B strings]}`` for the current step ->
        (B, Da); re-plans every ``n_action_steps`` with ``config.temperature``."""
        keys = [k for k in self.config.obs_keys if k != "instruction"]
        self._exec.observe({k: torch.as_tensor(obs[k]) for k in keys})
        return self._exec.next_action(lambda: self.predict_action_chunk(
            {**self._exec.stacked(), "instruction": obs["instruction"]}, self.config.temperature))

    # ------------------------------------------------------------------ training
    def action_tokens(self, actions: Tensor) -> Tensor:
        """(B, Ta, Da) actions in data units -> (B, Ta, Da) target tokens."""
        actions = actions.to(self.device, torch.float32)
        return self.tokenizer.encode(self.normalizer.normalize("action", actions))

    def compute_loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """Token cross-entropy. batch: obs keys as in ``obs_tokens`` (To steps), "action" (B, Ta, Da) in data
        units, "action_is_pad" (B, Ta) bool (padded steps are masked out)."""
        logits = self.action_distribution(batch)
        target = self.action_tokens(batch["action"])
        mask = ~batch["action_is_pad"].to(logits.device)
        loss = masked_reduce(-token_log_probs(logits, target), mask)
        with torch.no_grad():
            hit = (logits.argmax(-1) == target).float()
            acc = masked_reduce(hit, mask)
        return loss, {"loss": float(loss.detach()), "token_accuracy": float(acc)}
