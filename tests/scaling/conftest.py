"""Shared synthetic data: runs drawn from the paper's law with 0.4% noise (fits run once per session)."""
import pytest

from sparse_dc.scaling.fit import fit_law
from sparse_dc.scaling.synthetic import synthetic_runs

NOISE = 0.004


@pytest.fixture(scope="session")
def noise():
    return NOISE


@pytest.fixture(scope="session")
def train_runs():
    return synthetic_runs(150, noise=NOISE, seed=1)


@pytest.fixture(scope="session")
def test_runs():
    return synthetic_runs(40, noise=NOISE, seed=2)


@pytest.fixture(scope="session")
def paper_fit(train_runs):
    return fit_law(train_runs, "paper", "paper")
