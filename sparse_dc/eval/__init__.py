"""Downstream evaluation of trained runs with lm-evaluation-harness (`sparse-dc eval`): the paper's zero-shot suite
or custom tasks, through the project's own model or the exported Hugging Face one, scores joined to the ledger.

`sparse_dc.eval.config` imports neither torch nor the harness; the rest needs the `eval` extra (lm-eval).
"""
