"""Policy zoo (installed as ``embodied_distill.policies``): one folder per policy family, each with
``configuration_<name>.py`` and ``modeling_<name>.py``. ``base.py`` holds the shared contract."""
