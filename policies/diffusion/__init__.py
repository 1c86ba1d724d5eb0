from embodied_distill.policies.diffusion.configuration_diffusion import DiffusionPolicyConfig

__all__ = ["DiffusionPolicyConfig"]
