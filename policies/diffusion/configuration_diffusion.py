"""Configuration of the diffusion policy and its samplers."""

from __future__ import annotations

import dataclasses

from embodied_distill.policies.base import PolicyConfig

SAMPLERS = ("ddpm", "ddim", "streaming", "rti", "consistency", "ddim_eta")


@dataclasses.dataclass
class DiffusionPolicyConfig(PolicyConfig):
    # ---------------------------------------------------------------- network
    down_dims: tuple[int, ...] = (128, 256, 512)
    """U-Net channel widths per resolution (action_horizon must be divisible by 2**(len-1))."""
    step_embed_dim: int = 128
    """Size of the diffusion-step embedding."""
    kernel_size: int = 5
    """Temporal convolution kernel size."""
    n_groups: int = 8
    """GroupNorm groups."""
    obs_encoder: str = "state"
    """"state" (normalised, flattened To x Do) or "rgb" (a small CNN per image + the state features)."""
    image_size: int = 128
    """Input image size for the RGB encoder (square)."""
    crop_size: int = 116
    """Random crop (training) / centre crop (inference) size of the RGB encoder."""
    # ---------------------------------------------------------------- diffusion
    num_train_timesteps: int = 100
    """DDPM training steps N."""
    beta_schedule: str = "squaredcos_cap_v2"
    """diffusers beta schedule."""
    prediction_type: str = "sample"
    """"sample" (x0, the default) or "epsilon" (what the network predicts). On PickCube with the CPU-sized
    U-Net, x0 prediction made 10-step DDIM as good as 100-step DDPM (epsilon: 0.56 vs 0.94), and the
    consistency head (an x0 predictor) can start from the trained denoiser's weights."""
    clip_sample: bool = True
    """Clip predicted x0 to [-1, 1] (actions are normalised to that range)."""
    streaming_training_prob: float = 0.0
    """Probability of SDP's chunk-wise noise regime per training sample (0 disables; SDP uses 0.8).
    Needed by sampler=streaming; the rest of the batch uses one noise level per sample."""
    # ---------------------------------------------------------------- sampling (switchable at eval time)
    sampler: str = "ddpm"
    """ddpm | ddim | streaming | rti | consistency | ddim_eta (stochastic DDIM with per-step log-probs)."""
    num_inference_steps: int = 100
    """Denoising steps of ddpm/ddim (ddpm uses all training steps when equal to num_train_timesteps)."""
    streaming_levels: int = 0
    """Noise levels spanned by the streaming buffer (0: one level per chunk, i.e. h)."""
    streaming_eta: float = 1.0
    """DDIM eta of the streaming buffer's steps: 1 (default) the DDPM posterior noise, as SDP's DDPM
    buffer; 0 deterministic DDIM. On PickCube eta 1 let the buffer follow new observations: 1.00 vs 0.87
    (30 unseen seeds, same checkpoint); deterministic steps keep the front chunks' stale plan."""
    streaming_level_power: float = 1.0
    """Buffer level l -> timestep ``N ((l+1) / L) ** power``: 1 spaces the levels evenly (SDP); < 1 keeps
    the front chunks noisier, so their last denoising call can still follow the newest observation."""
    rti_steps: tuple[int, ...] = (10, 0)
    """RTI warm-start: training timesteps to noise the shifted guess to and denoise through (DDIM)."""
    rti_gripper: str = "clip"
    """Gripper handling for RTI: "clip" (binarise the reused guess), "none"."""
    gripper_dims: tuple[int, ...] = (-1,)
    """Indices of binary gripper action dimensions (normalised units)."""
    consistency_steps: int = 1
    """Steps of the consistency head at inference (1 or 2)."""
    eta: float = 1.0
    """sampler=ddim_eta: DDIM's eta (0 deterministic, 1 DDPM-like variance)."""
    min_std: float = 0.05
    """sampler=ddim_eta: floor on each step's std (DDIM's last step has none): every step is stochastic."""
    seed: int | None = None
    """Seed of the sampling noise (None: global RNG); samplers reset to it every episode."""

    def __post_init__(self):
        super().__post_init__()
        self.down_dims = tuple(self.down_dims)
        self.rti_steps = tuple(int(s) for s in self.rti_steps)
        self.gripper_dims = tuple(self.gripper_dims)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.prediction_type not in ("epsilon", "sample"):
            raise ValueError(f"prediction_type must be epsilon or sample, got {self.prediction_type!r}")
        if self.obs_encoder not in ("state", "rgb"):
            raise ValueError(f"obs_encoder must be state or rgb, got {self.obs_encoder!r}")
        if self.action_horizon % (2 ** (len(self.down_dims) - 1)):
            raise ValueError(f"action_horizon={self.action_horizon} must be divisible by "
                             f"2**(len(down_dims)-1)={2 ** (len(self.down_dims) - 1)}")
        if not 1 <= self.num_inference_steps <= self.num_train_timesteps:
            raise ValueError("num_inference_steps must be in [1, num_train_timesteps]")
        if not 0.0 <= self.streaming_eta <= 1.0:
            raise ValueError(f"streaming_eta must be in [0, 1], got {self.streaming_eta}")
        if not 0.0 < self.streaming_level_power <= 1.0:
            raise ValueError(f"streaming_level_power must be in (0, 1], got {self.streaming_level_power}")
        if not 0.0 <= self.streaming_training_prob <= 1.0:
            raise ValueError("streaming_training_prob must be in [0, 1]")
        if any(not 0 <= s < self.num_train_timesteps for s in self.rti_steps) or \
                list(self.rti_steps) != sorted(self.rti_steps, reverse=True) or not self.rti_steps:
            raise ValueError(f"rti_steps must be decreasing training timesteps, got {self.rti_steps}")
        if self.rti_gripper not in ("clip", "none"):
            raise ValueError("rti_gripper must be 'clip' or 'none'")
        if self.consistency_steps not in (1, 2):
            raise ValueError("consistency_steps must be 1 or 2")
        if self.eta < 0 or self.min_std <= 0:
            raise ValueError(f"eta must be >= 0 and min_std > 0, got eta={self.eta}, min_std={self.min_std}")
        if self.crop_size > self.image_size:
            raise ValueError("crop_size must be <= image_size")

    @property
    def n_chunks(self) -> int:
        """h: chunks of n_action_steps in the streaming buffer (no past-action prefix: h = Tp // Ta)."""
        return self.action_horizon // self.n_action_steps

    @property
    def n_levels(self) -> int:
        """Noise levels of the streaming buffer."""
        return self.streaming_levels or self.n_chunks
