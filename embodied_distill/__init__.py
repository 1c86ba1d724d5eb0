"""embodied_distill: distil big, slow or general robot policies into fast students.

Sub-packages: ``losses`` (the shared loss core), ``data`` (zarr episode store, normaliser, sampler),
``distill`` (one file per method), ``sim`` (simulation runners), ``policies`` (policy zoo),
``real_robot`` (control bridge). See README.md for the map.
"""

__version__ = "0.1.0"
