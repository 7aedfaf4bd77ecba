"""Synthetic runs drawn from a known law: the test oracle and the benchmark's data (a ledger the fit must recover).

The design follows scaling-law.md's measurement: dense-equivalent sizes 3e7..2e9, the paper's densities
1..0.0625, unique budgets 1e8..3e9, 1..16 epochs, multiplicative log-normal noise on the loss.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from sparse_dc.scaling.forms import PAPER, LawForm, get_form
from sparse_dc.scaling.ledger import Runs

PAPER_DENSITIES = (1.0, 0.5, 0.25, 0.125, 0.0625)


def synthetic_runs(n: int = 300, params: Mapping[str, float] = PAPER, form: str | LawForm = "paper",
                   noise: float = 0.004, seed: int = 0, sizes: tuple[float, float] = (3e7, 2e9),
                   unique: tuple[float, float] = (1e8, 3e9), single_epoch_share: float = 0.3) -> Runs:
    """`n` runs with loss = law(params) * exp(noise * N(0, 1)); sorted by dense-equivalent size (ascending).

    Sizes and unique budgets are log-uniform; densities uniform over PAPER_DENSITIES; epochs are 1 with
    probability `single_epoch_share`, else one of 2, 4, 8, 16 (so every stage of the paper's fit has runs).
    """
    law = get_form(form) if isinstance(form, str) else form
    rng = np.random.default_rng(seed)
    dense_params = np.exp(rng.uniform(*np.log(sizes), n))
    density = rng.choice(PAPER_DENSITIES, n)
    unique_tokens = np.exp(rng.uniform(*np.log(unique), n))
    epochs = np.where(rng.random(n) < single_epoch_share, 1.0, rng.choice([2.0, 4.0, 8.0, 16.0], n))
    order = np.argsort(dense_params)
    runs = Runs(name=np.array([f"syn-{i:04d}" for i in range(n)], dtype=object), dense_params=dense_params[order],
                active_params=(dense_params * density)[order], density=density[order],
                unique_tokens=unique_tokens[order], tokens=(unique_tokens * epochs)[order], val_loss=np.ones(n))
    loss = law.predict(params, runs) * np.exp(noise * rng.standard_normal(n))
    return Runs(**{**runs.__dict__, "val_loss": loss})
