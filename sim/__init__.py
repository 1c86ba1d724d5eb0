"""Simulation runners (installed as ``embodied_distill.sim``).

A runner builds seeded vector envs with a uniform numpy interface (``reset(seeds)``, ``step``,
``render``) and evaluates policies headless through ``evaluation.evaluate_policy``. Simulators are
imported lazily inside the runner modules.
"""
