"""The mmap-threshold memory policy: freed large tensors go back to the operating system."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from embodied_distill.lm.config import TrainConfig
from embodied_distill.memory import _glibc, set_mmap_threshold

# 100 x 3 MiB tensors interleaved with small long-lived ones, after one freed 3 MiB block has raised
# glibc's dynamic threshold: prints the fraction of the big tensors' resident memory still held after
# they are freed.
WORKLOAD = textwrap.dedent(
    """
    import sys, torch
    from embodied_distill.memory import set_mmap_threshold

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024

    if sys.argv[1] == "policy":
        assert set_mmap_threshold(1.0)
    x = torch.ones(3 * 2**18)
    del x
    base = rss_mib()
    big, small = [], []
    for _ in range(100):
        big.append(torch.ones(3 * 2**18))
        small.append(torch.ones(64))
    peak = rss_mib()
    del big
    print((rss_mib() - base) / (peak - base))
    """
)


def _retained(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True, check=True, timeout=120
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_glibc() is None, reason="the policy is glibc's mallopt")
def test_freed_tensors_return_to_the_system_only_with_the_policy():
    default, policy = _retained("default"), _retained("policy")
    assert default > 0.8, f"glibc's default was expected to keep the freed blocks (kept {default:.2f})"
    assert policy < 0.1, f"with the policy {policy:.2f} of the freed memory is still resident"


@pytest.mark.parametrize("mib", [0.0, -1.0, 33.0])
def test_out_of_range_threshold_is_refused(mib):
    with pytest.raises(ValueError, match="mmap threshold"):
        set_mmap_threshold(mib)
    with pytest.raises(ValueError, match="train.mmap_threshold_mib"):
        TrainConfig(mmap_threshold_mib=mib)


def test_default_config_applies_the_policy_and_null_leaves_it():
    assert TrainConfig().mmap_threshold_mib == 1.0
    assert TrainConfig(mmap_threshold_mib=None).mmap_threshold_mib is None
