"""Launching runs: grids of training runs (`sweep`), locally or on SLURM."""
