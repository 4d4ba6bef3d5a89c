"""A real Slurm cluster (munged + slurmctld + 4 slurmd, fake GPU nodes) for the module's tests."""

from __future__ import annotations

import pytest

from tests.remediate.slurmlab import BINARIES, slurm_lab
from tests.support import require_binary


@pytest.fixture(scope="session")
def slurm_cluster():
    for name in (*BINARIES, "mknod"):
        require_binary(name)
    with slurm_lab() as lab:
        yield lab


@pytest.fixture
def slurm(slurm_cluster):
    """The cluster with every node idle and undrained, before and after the test."""
    slurm_cluster.reset()
    yield slurm_cluster
    slurm_cluster.reset()
