"""Configuration of the MLP behaviour-cloning policy with action chunking."""

from __future__ import annotations

import dataclasses

from embodied_distill.policies.base import PolicyConfig


@dataclasses.dataclass
class MLPPolicyConfig(PolicyConfig):
    hidden_dims: tuple[int, ...] = (512, 512, 512)
    """Widths of the hidden layers."""
    dropout: float = 0.0
    """Dropout after each hidden layer (0 disables)."""
    obs_noise_std: float = 0.0
    """Std of Gaussian noise added to normalised observations during training (regularises)."""
    loss: str = "mse"
    """Regression loss on normalised actions: "mse" or "l1"."""

    def __post_init__(self):
        super().__post_init__()
        self.hidden_dims = tuple(self.hidden_dims)
        if not self.hidden_dims or min(self.hidden_dims) < 1:
            raise ValueError(f"hidden_dims must be positive widths, got {self.hidden_dims}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.obs_noise_std < 0:
            raise ValueError("obs_noise_std must be >= 0")
        if self.loss not in ("mse", "l1"):
            raise ValueError(f"loss must be 'mse' or 'l1', got {self.loss!r}")
