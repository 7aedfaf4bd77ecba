"""Config of the sparsity stage: granularity, initial per-layer densities, and the dynamic-sparse-training schedule.

Defaults follow the paper's scripts (reference/model-sizes.md): SET, prune rate 0.1 with cosine decay, topology
update every 100 steps, uniform init, zero re-init of regrown weights, attention/MLP density ratio 1.0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from sparse_dc.config.base import Config, ConfigError

PROJECTION_KINDS = ("q", "k", "v", "o", "gate", "up", "down")
BLOCK_SIZES = (1, 16, 32, 64, 128)
RiglScores = Literal["exact", "norm_sum"]
GrowCandidates = Literal["dead_before_drop", "dead_after_drop"]
RegrowOptimizer = Literal["reset", "adamdst"]
BlockTopology = Literal["path_aware", "independent"]
RegrowInit = Literal["zero", "normal"]


@dataclass(kw_only=True)
class SparsityConfig(Config):
    density: float = 1.0
    """Global fraction of live weights over the sparse projections, in (0, 1]; 1.0 = a dense model."""
    block_size: int = 1
    """1 = unstructured (dense weight x {0,1} mask, the paper's setting); 16/32/64/128 = block-sparse kernels,
    where weights, gradients and optimizer state scale with density. B must divide hidden_size; the SwiGLU
    width is rounded up to a multiple of B."""
    targets: list[str] = field(default_factory=lambda: list(PROJECTION_KINDS))
    """Which block projections are sparse (q, k, v, o, gate, up, down); embedding and LM head stay dense."""
    distribution: Literal["uniform", "erk", "am_ratio"] = "uniform"
    """How the global density is split over layers: same density everywhere; Erdős–Rényi-Kernel (density
    proportional to ((in + out) / (in x out)) ** erk_power_scale); or attention/MLP density ratio `am_ratio`."""
    erk_power_scale: float = 1.0
    """ERK exponent (RigL's `erk_power_scale`; 0 gives uniform)."""
    am_ratio: float = 1.0
    """Attention density / MLP density for distribution=am_ratio (the paper's scripts: 1.0)."""
    method: Literal["static", "set", "rigl"] = "set"
    """static: fixed topology; set: drop smallest magnitude, grow random; rigl: drop smallest magnitude, grow
    the largest dense-gradient scores."""
    rigl_scores: RiglScores = "exact"
    """How RigL scores dead blocks (B >= 16; B = 1 is always exact). exact: the Frobenius norm of the dead block's
    gradient summed over the update step's micro-batches and ranks, as RigL defines it; costs an fp32 buffer of
    (1 - density) x the dense size of each sparse layer during update steps (sparse_dc.sparsity.layer).
    norm_sum: the sum of per-micro-batch, per-rank block norms (an upper bound of the exact score, equal to it
    only with one micro-batch on one rank); needs one float per block."""
    kernel_backend: Literal["auto", "triton", "reference"] = "auto"
    """How block-sparse layers (block_size >= 16) compute, forward, backward and RigL's scores. triton: the Triton
    kernels (what GPUs run; on CPU only under Triton's interpreter, TRITON_INTERPRET=1 in the environment: slow, for
    tests); reference: torch on the dense masked weight; auto: the SPARSE_DC_KERNEL_BACKEND environment variable if
    set, else triton on CUDA and reference on CPU."""
    update_frequency: int = 100
    """Optimizer steps between topology updates."""
    prune_rate: float = 0.1
    """Fraction of each layer's live entries/blocks replaced at an update, before decay; in [0, 1)."""
    prune_rate_decay: Literal["cosine", "constant", "linear"] = "cosine"
    """Decay of the prune rate from `prune_rate` at step 0 to `min_prune_rate` at the stop step."""
    min_prune_rate: float = 0.0
    """Floor of the decayed prune rate. 0: the rate decays to 0 at the stop step and updates stop there (RigL's
    schedule); > 0 (the paper's code: 0.005): the rate decays to this floor over all steps and updates never stop,
    which needs stop_fraction = 1."""
    stop_fraction: float = 0.75
    """Topology updates stop after this fraction of the run's optimizer steps, in (0, 1]."""
    grow_candidates: GrowCandidates = "dead_before_drop"
    """Which units an update may grow. dead_before_drop: units dead before the update (a just-dropped unit never
    comes back in the same update); dead_after_drop: every unit dead once the drop is done, just-dropped ones
    included (RigL's and the paper's code)."""
    regrow_optimizer: RegrowOptimizer = "reset"
    """Optimizer state of regrown weights. reset: Adam moments zeroed, the optimizer's global step continues;
    adamdst (the paper's code, sparse runs only): the run uses the AdamDST optimizer, which keeps a step count
    per weight; a regrown weight gets zeroed moments and its count set to `regrow_step`, and every first moment
    is scaled by min(count / momentum_ramp_steps, 1) each step (sparse_dc/sparsity/adamdst.py)."""
    regrow_step: int = 5
    """adamdst: the per-weight step count a regrown weight restarts from (the paper's code: 5)."""
    momentum_ramp_steps: int = 20
    """adamdst: every step multiplies a weight's first moment by min(its step count / this, 1) (the paper's
    code: 20)."""
    seed: int = 0
    """Seeds the initial topology and SET's random growth (same on every rank)."""
    block_topology: BlockTopology = "path_aware"
    """Block masks (B > 1). path_aware: every live block lies on a live gradient path at initialisation and after
    every update, with the same exact densities (sparse_dc.sparsity.paths); independent: each layer's mask drawn
    and updated on its own, so some live blocks can never receive a gradient (for comparison). B = 1 always uses
    independent masks, the paper's."""
    regrow_init: RegrowInit = "zero"
    """Value of a regrown weight: zero (the paper's choice, and RigL's) or normal: drawn from
    N(0, (regrow_init_scale x the layer's init std)^2), from a generator keyed by (seed, step, layer)."""
    regrow_init_scale: float = 0.1
    """Std of a regrown weight as a fraction of its layer's init std (model.init_std; o and down: scaled by
    1 / sqrt(2 n_layers)); only with regrow_init=normal."""

    def validate(self, path: str = "") -> None:
        self.check(0.0 < self.density <= 1.0, path, "density", "a number in (0, 1]")
        self.check(self.block_size in BLOCK_SIZES, path, "block_size", f"one of {', '.join(map(str, BLOCK_SIZES))}")
        self.check(len(self.targets) > 0 and all(t in PROJECTION_KINDS for t in self.targets), path, "targets",
                   f"a non-empty list of {', '.join(PROJECTION_KINDS)}")
        self.check(len(set(self.targets)) == len(self.targets), path, "targets", "no repeated projection")
        self.check(self.erk_power_scale >= 0, path, "erk_power_scale", "a number >= 0")
        self.check(self.am_ratio > 0, path, "am_ratio", "a number > 0")
        self.check(self.rigl_scores in get_args(RiglScores), path, "rigl_scores", "'exact' or 'norm_sum'")
        self.check(self.update_frequency >= 1, path, "update_frequency", "an integer >= 1")
        self.check(0.0 <= self.prune_rate < 1.0, path, "prune_rate", "a number in [0, 1)")
        self.check(0.0 <= self.min_prune_rate <= self.prune_rate, path, "min_prune_rate",
                   f"a number in [0, prune_rate={self.prune_rate}]")
        self.check(0.0 < self.stop_fraction <= 1.0, path, "stop_fraction", "a number in (0, 1]")
        if self.min_prune_rate > 0:
            self.check(self.stop_fraction == 1.0, path, "stop_fraction",
                       f"1.0 with min_prune_rate={self.min_prune_rate} (a floored prune rate decays over all steps "
                       "and never stops)")
        self.check(self.grow_candidates in get_args(GrowCandidates), path, "grow_candidates",
                   "'dead_before_drop' or 'dead_after_drop'")
        if self.grow_candidates == "dead_after_drop" and self.method == "rigl" and self.block_size > 1:
            self.check(self.rigl_scores == "norm_sum", path, "grow_candidates",
                       "'dead_before_drop' for block RigL with rigl_scores='exact' (exact block scores are "
                       "captured for blocks dead before the update only; use rigl_scores='norm_sum' or B = 1)")
        self.check(self.regrow_optimizer in get_args(RegrowOptimizer), path, "regrow_optimizer",
                   "'reset' or 'adamdst'")
        self.check(self.regrow_step >= 0, path, "regrow_step", "an integer >= 0")
        self.check(self.momentum_ramp_steps >= 1, path, "momentum_ramp_steps", "an integer >= 1")
        self.check(self.kernel_backend in ("auto", "triton", "reference"), path, "kernel_backend",
                   "'auto', 'triton' or 'reference'")
        self.check(self.block_topology in get_args(BlockTopology), path, "block_topology",
                   "'path_aware' or 'independent'")
        self.check(self.regrow_init in get_args(RegrowInit), path, "regrow_init", "'zero' or 'normal'")
        self.check(self.regrow_init_scale > 0, path, "regrow_init_scale", "a number > 0")
        super().validate(path)

    @property
    def sparse(self) -> bool:
        """Whether any layer is sparse (density < 1)."""
        return self.density < 1.0


def check_block_divides(block_size: int, hidden_size: int, path: str = "sparsity") -> None:
    """Block-sparse layers need B | hidden_size (the SwiGLU width is rounded up instead); ConfigError otherwise."""
    if block_size > 1 and hidden_size % block_size:
        raise ConfigError(f"{path}.block_size={block_size}: expected a divisor of model hidden_size={hidden_size} "
                          f"(block-sparse layers tile both dims of every projection)")
