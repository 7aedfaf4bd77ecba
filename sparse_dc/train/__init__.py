"""Training engine: DeepSpeed ZeRO 1/2/3 loop, checkpoints with exact resume, metrics, the run ledger, export.

`sparse_dc.train.config` (TrainConfig) imports neither torch nor DeepSpeed; the rest is imported when used.
"""
