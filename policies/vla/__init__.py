"""Vision-language-action policies: a trainable VLA with action tokens (``modeling_vla``), loaders for
real VLA checkpoints (``loaders``) and the remote VLA teacher (``remote``)."""

from embodied_distill.policies.vla.configuration_vla import VLAPolicyConfig
from embodied_distill.policies.vla.tokenizer import ActionTokenizer

__all__ = ["ActionTokenizer", "VLAPolicyConfig"]
