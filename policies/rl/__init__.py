"""Gaussian actor-critic and residual policies for RL students (stable-baselines3 engine)."""
