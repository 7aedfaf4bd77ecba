"""Llama model, presets, parameter accounting and FLOPs; `build_model` wires in `sparse_dc.sparsity`.

Names are loaded on first use, so importing the configs (`sparse_dc.model.config`) never imports torch.
"""
import importlib

_EXPORTS = {
    "ModelConfig": "config", "ModelShape": "config", "PRESETS": "config",
    "Llama": "llama",
    "ParamCounts": "params", "count_params": "params", "flops_per_token": "params",
    "build_model": "build", "model_shape": "build", "param_counts": "build", "resolve_vocab": "build",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparse_dc.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"sparse_dc.model.{_EXPORTS[name]}"), name)
