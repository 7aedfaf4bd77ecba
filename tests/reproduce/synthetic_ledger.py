"""Synthetic ledgers for a reproduction grid: losses drawn from the paper's law form (toy-scale coefficients)."""
import json

import numpy as np
from sparse_dc.scaling.forms import PAPER, get_form
from sparse_dc.scaling.optimize import predict_loss

# dense-equivalent parameters per size name (the tiny scale's order of magnitude)
SIZES = {"h16": 2.0e4, "h32": 5.3e4, "h64": 1.48e5, "h128": 4.6e5}
# the paper's form with toy-scale A, B, E (losses of ~6-9 nats at these sizes)
TOY = {**PAPER, "a": 4.0, "b": 4.5, "e": 1.2}


def write_synthetic(path, scale, params=TOY, noise=0.004, seed=0):
    """One ledger row per grid point of `scale`; returns the run names."""
    rng, names = np.random.default_rng(seed), []
    with open(path, "w", encoding="utf-8") as fh:
        for size in scale.sizes:
            for density in scale.densities:
                for epochs in scale.epochs:
                    n, u = SIZES[size], scale.unique_tokens
                    loss = float(predict_loss(get_form("paper"), params, n * density, u, u * epochs, density))
                    name = f"{size}-d{density:g}-e{epochs:g}"
                    names.append(name)
                    fh.write(json.dumps({"name": name, "dense_params": n, "active_params": n * density,
                                         "density": density, "unique_tokens": u, "tokens": u * epochs,
                                         "val_loss": loss * (1 + noise * rng.standard_normal()),
                                         "wall_time_s": 1.0}) + "\n")
    return names
