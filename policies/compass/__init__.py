"""Embodiment-agnostic policy for COMPASS cross-embodiment merging (IL base and generalist)."""
