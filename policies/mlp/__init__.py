from embodied_distill.policies.mlp.configuration_mlp import MLPPolicyConfig

__all__ = ["MLPPolicyConfig"]
