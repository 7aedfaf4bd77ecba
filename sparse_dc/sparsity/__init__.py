"""Sparse layers, initial density distributions and dynamic sparse training (static, SET, RigL).

Names are loaded on first use, so importing the config (`sparse_dc.sparsity.config`) never imports torch, and
nothing here imports DeepSpeed (only the optimizer-state accessor does, lazily, when given a DeepSpeed engine).
"""
import importlib

_EXPORTS = {
    "SparsityConfig": "config",
    "SparseLinear": "layer", "MaskedLinear": "layer", "BlockSparseLinear": "layer", "sparse_linear": "layer",
    "DSTEngine": "dst",
    "optimizer_state": "optim_state", "OptimizerState": "optim_state", "TorchOptimizerState": "optim_state",
    "AdamDST": "adamdst",
    "DeepSpeedOptimizerState": "optim_state", "fix_deepspeed_state_after_load": "optim_state",
    "allocate": "distribution", "LayerSpec": "distribution",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparse_dc.sparsity' has no attribute {name!r}")
    return getattr(importlib.import_module(f"sparse_dc.sparsity.{_EXPORTS[name]}"), name)
