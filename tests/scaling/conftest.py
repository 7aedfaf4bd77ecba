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


@pytest.fixture
def two_coefficient_form():
    """Chinchilla with a one-stage fit of a, b only (a reduction whose joint step has more to fit than its stage),
    registered under its name 'chinchilla-ab' for the duration of a test."""
    from dataclasses import replace

    import numpy as np

    from sparse_dc.scaling import forms

    law = replace(forms.get_form("chinchilla"), name="chinchilla-ab",
                  stages=(forms.Stage("1-ab", ("a", "b"), lambda x: np.ones(len(x.tokens), bool),
                                      {"a": (5.0, 6.0), "b": (5.0, 6.0)}),))
    forms.register_form(law)
    yield law
    forms._FORMS.pop(law.name, None)
