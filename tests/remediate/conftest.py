"""A real Slurm cluster (munged + slurmctld + 4 slurmd, fake GPU nodes) for the module's tests."""

from __future__ import annotations

import os

import pytest

from tests.remediate.slurmlab import BINARIES, slurm_lab
from tests.support import require_binary


def require_slurm_lab() -> None:
    for name in (*BINARIES, "mknod"):
        require_binary(name)
    if os.geteuid() != 0:
        pytest.skip("the Slurm test cluster needs root (mknod for the fake GPU devices, SlurmUser=root)")


@pytest.fixture(scope="session")
def slurm_cluster():
    require_slurm_lab()
    with slurm_lab() as lab:
        yield lab


@pytest.fixture
def slurm(slurm_cluster):
    """The cluster with every node idle and undrained, before and after the test."""
    slurm_cluster.reset()
    yield slurm_cluster
    slurm_cluster.reset()
