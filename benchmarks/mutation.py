"""Mutation testing of the core modules, one module at a time against its own tests (mutmut).

    python benchmarks/mutation.py                      # every module below, one after another (hours on 2 cores)
    python benchmarks/mutation.py data/loader          # one module
    python benchmarks/mutation.py --list               # the modules and the tests each one runs
    nice -n 10 python benchmarks/mutation.py scaling/forms > mutation.log 2>&1 &   # on a shared machine

mutmut changes one thing in a function (an operator, a constant, a comparison, a returned value...) and runs the
tests that call that function; a mutant the tests still pass ("survived") is a bug the suite would not catch. Each
module is run in a scratch copy of the package (`.mutation/<module>/`, git-ignored; `kernels/` laid in as
`sparse_dc/kernels` as the installed package has it), with only the test files listed in MODULES below, so a module
costs minutes rather than the whole suite per mutant. Modules are tested through in-process tests (a subprocess
would import the installed package, not the mutant).

Results: benchmarks/results/mutation/<module>.json (counts and every surviving mutant's diff) and the table
benchmarks/results/mutation.md. The score counts killed and timed-out mutants over all tested ones, less those
listed in EQUIVALENT (mutants that cannot change behaviour, each with the reason). Not part of CI: too slow; the
tests written to kill mutants are.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "mutation")
SCRATCH = os.path.join(ROOT, ".mutation")

# module (under sparse_dc/, or kernels/ for kernels/...) -> the test files that are its own tests
MODULES: dict[str, list[str]] = {
    "data/loader": ["tests/data/test_loader.py", "tests/data/test_loader_documents.py",
                    "tests/data/test_loader_properties.py", "tests/data/test_loader_edges.py"],
    "data/shards": ["tests/data/test_shards.py", "tests/data/test_loader.py", "tests/data/test_prepare_errors.py",
                    "tests/data/test_prepare.py", "tests/data/test_shard_checks.py"],
    "sparsity/topology": ["tests/sparsity/test_sparsity_dst.py", "tests/sparsity/test_sparsity_recipe.py",
                          "tests/sparsity/test_sparsity_properties.py"],
    "sparsity/dst": ["tests/sparsity/test_sparsity_dst.py", "tests/sparsity/test_sparsity_recipe.py",
                     "tests/sparsity/test_sparsity_paths.py"],
    "sparsity/layer": ["tests/sparsity/test_sparsity_layer.py", "tests/sparsity/test_sparsity_dst.py",
                       "tests/sparsity/test_sparsity_recipe.py"],
    "kernels/layout": ["tests/kernels/test_kernel_layout.py", "tests/kernels/test_layout_errors.py",
                       "tests/kernels/test_layout_properties.py", "tests/kernels/test_kernel_reference.py"],
    "train/config": ["tests/train/test_train_config.py", "tests/test_config.py"],
    "train/checkpoint": ["tests/train/test_train_units.py", "tests/train/test_train_checkpoint.py",
                         "tests/train/test_checkpoint_engine.py"],
    "scaling/forms": ["tests/scaling/test_forms.py", "tests/scaling/test_fit.py"],
    "scaling/fit": ["tests/scaling/test_fit.py", "tests/scaling/test_fit_solvers.py", "tests/scaling/test_forms.py"],
    "scaling/uncertainty": ["tests/scaling/test_uncertainty.py"],
}

# Mutants that cannot change behaviour, by mutmut name (module -> name -> reason); the score leaves them out.
_LEAF_SECTION = ("Config.validate(path) only recurses into sub-sections, and this section has none: the path it "
                 "is given is never read")
_NEVER_PRINTS = "steps_per_print: any value beyond the run's step count keeps DeepSpeed's step prints off"
_SET_OF_INDICES = "topk's indices are used as a set (to index a mask): their order does not matter"
_ONE_DEVICE = ("`.to(mask.device)` of indices already on the mask's device: a no-op here, where the tests run on the "
               "CPU (it matters on a GPU, where tests/sparsity's GPU-free suite cannot see it)")
_SIDE_LEFT = "side='left' is np.searchsorted's default"
_FAST_PATH = ("which rows take the one-gather fast path (its piece lookup or edge comparisons): a row it turns away "
              "is copied by the per-row path, whose own piece lookup or edge test may send it to the piecewise "
              "read; every path copies the same tokens, only the speed differs")
_EPOCH_CACHE = "how many epochs' offsets are cached: the same offsets, only memory and recomputation differ"
_PLUS_ZERO = "E - 0 is E + 0 exactly: the zero array only broadcasts E to every run (a Dual's derivatives unchanged)"
_JSON_LAYOUT = "indentation of FIT.json only: json.load (load_fit, any reader) parses the same document"
_UTF8_LOCALE = ("open() without an encoding reads with the locale's, which is UTF-8 here and under Python's C-locale "
                "coercion; 'UTF-8' and 'utf-8' name the same codec")
_FORMS_CONVERT = ("the law forms convert every input field to float64 themselves (test_float32_inputs_are_computed_in_"
                  "float64, test_counts_beyond_int64_in_every_field)")
_FLUSHED = "print(..., flush=...) of a line to stderr: stderr is line-buffered, the line appears either way"
_ANY_NONZERO = "the stop flag is read as bool(any rank's value): max and sum, 1 and 2, int32 and int64 agree on it"
_CPU_TENSOR = ("the flag tensor's device: the CPU is the default device, and the tests run on the CPU (on a GPU, "
               "NCCL needs it on the rank's device)")
_L = "sparse_dc.kernels.layout.xǁBlockLayoutǁ"
_CPU_ONLY = ("a tensor built beside the layout's own with `device=` dropped, or `.to(self.device)` of a mask: the "
             "tests' masks and layouts are on the CPU, the default device (a layout from a mask cannot be built on the "
             "meta device, nonzero() needs values)")
_INT32_ANYWAY = "the constructor converts row_ptr, col_idx and slot to int32 (`_as_index`) whatever they arrive as"
_TRUSTED = ("validate= for indices built from a mask or another layout: the checks pass, only their host syncs are "
            "saved")
_CPU_DEVICE = ("a `device=` or `.to(device)` that places a tensor where it already is on a one-device CPU run: a "
               "no-op here (it matters on a GPU, which tests/sparsity's GPU-free suite cannot see)")
_STREAM_NAME = ("the name in the regrow stream's key (changed, dropped or None): still a reproducible stream keyed by "
                "(seed, step, layer) and independent of the other keyed streams ('paths')")
_INDEX_CHECK = ("check_indices None, True or left at its default (True) instead of False: only adds a range check "
                "of block indices that arm_scores built from this layout, which always passes (a host sync, never "
                "a different result)")
EQUIVALENT: dict[str, dict[str, str]] = {
    "data/loader": {
        "sparse_dc.data.loader.xǁTokenBudgetǁ__init____mutmut_17": _EPOCH_CACHE,
        "sparse_dc.data.loader.xǁTokenBudgetǁ__init____mutmut_57": _SIDE_LEFT,
        "sparse_dc.data.loader.x_make_plan__mutmut_48": _SIDE_LEFT,
        **{f"sparse_dc.data.loader.x_make_plan__mutmut_{i}": "the validation cut's document index when val_tokens is "
           "0: the pool then starts at 0 without reading it" for i in (41, 51, 52)},
        **{f"sparse_dc.data.loader.x_make_plan__mutmut_{i}": "the branch for a cut past the last document end: that "
           "end is corpus_tokens >= val_tokens (checked first), so the cut always finds a document" for i in (60, 62)},
        "sparse_dc.data.loader.xǁTokenBudgetǁ__init____mutmut_18": _EPOCH_CACHE,
        **{f"sparse_dc.data.loader.xǁTokenBudgetǁ_range_offsets__mutmut_{i}": "the dtype of an empty offsets array: "
           "every reader of it converts to int64 or yields an int64 [0, L] array" for i in (9, 11)},
        "sparse_dc.data.loader.xǁTokenBudgetǁ_range_offsets__mutmut_32": "np.concatenate of a single slice: a copy "
                                                                         "of the same offsets instead of the view",
    },
    "data/shards": {
        "sparse_dc.data.shards.xǁTokenStreamǁgather__mutmut_7": "SMALL_BATCH_ROWS rows taken by the one-gather path "
                                                                 "instead of row by row: a speed threshold, both "
                                                                 "paths copy the same tokens",
        **{f"sparse_dc.data.shards.x__json_kind__mutmut_{i}": "the fallback name for a type json.load never yields "
           "(it yields dict, list, str, bool, int, float or None, all in the table)" for i in (20, 22, 24)},
        **{f"sparse_dc.data.shards.xǁTokenStreamǁgather__mutmut_{i}": _FAST_PATH for i in (15, 16, 18, 22, 38, 40)},
        **{f"sparse_dc.data.shards.x_read_manifest__mutmut_{i}": _UTF8_LOCALE for i in (13, 15, 17)},
        **{f"sparse_dc.data.shards.x_open_stream__mutmut_{i}": "manifest_tokenizer without the manifest reads the "
           "same manifest file again" for i in (9, 11)},
        **{f"sparse_dc.data.shards.x__map_shards__mutmut_{i}": "zero_copy_only False or None: numpy views of the "
           "same values (a copy only where zero-copy is impossible, never for these primitive lists)" for i in (52, 53)},
        **{f"sparse_dc.data.shards.x__map_shards__mutmut_{i}": "np.asarray of Python ints is int64 without the "
           "dtype too (numpy >= 2 on every platform)" for i in (107, 109)},
        "sparse_dc.data.shards.x__map_shards__mutmut_39": "pa.memory_map's default mode is 'r'",
        "sparse_dc.data.shards.x__check_fields__mutmut_5": "rstrip of the characters 'X' and '.': no field prefix "
                                                            "ends in X, so the same name",
        "sparse_dc.data.shards.x_sha256_file__mutmut_8": "reading the file in one piece instead of chunks: the same "
                                                          "hash, only the memory differs",
    },
    "scaling/fit": {
        **{f"sparse_dc.scaling.fit.xǁFitResultǁsave__mutmut_{i}": _JSON_LAYOUT for i in (7, 9, 10)},
        **{f"sparse_dc.scaling.fit.x_load_fit__mutmut_{i}": _UTF8_LOCALE for i in (2, 4, 6)},
        **{f"sparse_dc.scaling.fit.x_fit_anchored__mutmut_{i}": "an anchored fit has one start: top_k 2 or None "
                                                                 "(slice [:None]) polishes that start as 1 does"
           for i in (38, 51)},
        "sparse_dc.scaling.fit.x_fit_metrics__mutmut_34": 'float("NAN") is float("nan")',
        "sparse_dc.scaling.fit.x_grid_starts__mutmut_16": "numpy reads any negative size in reshape as the unknown one",
        "sparse_dc.scaling.fit.x_fit_law__mutmut_143": ("the joint step polishes all its starts: top_k None (slice "
                                                        "[:None]) is len(starts)"),
        "sparse_dc.scaling.fit.x_fit_stage__mutmut_26": "np.argsort reads kind case-insensitively: 'STABLE' is 'stable'",
        **{f"sparse_dc.scaling.fit.x_grid_objective__mutmut_{i}": (
            "how many grid rows are evaluated per block (the memory bound, or overlapping blocks with step 1): every "
            "row's objective is the same in any block (test_grid_objective_is_the_objective_at_each_start_whatever_"
            "the_block_size)") for i in (1, 9, 15, 21)},
        "sparse_dc.scaling.fit.x__local__mutmut_17": ("the upper bound of a parameter without bounds: (+inf, inf)[1] is "
                                                      "inf as (-inf, inf)[1] is"),
        "sparse_dc.scaling.fit.x__local__mutmut_101": "1e+30 is the float 1e30",
        **{f"sparse_dc.scaling.fit.x__local__mutmut_{i}": (
            "scipy.optimize.minimize with bounds and no method picks L-BFGS-B, and reads method names "
            "case-insensitively") for i in (124, 130, 135)},
        "sparse_dc.scaling.fit.x__local__mutmut_81": "least_squares' default method is 'trf'",
    },
    "scaling/uncertainty": {
        **{f"sparse_dc.scaling.uncertainty.x_bootstrap__mutmut_{i}": (
            "the process pool's size, chunking or when it is used (n >= 1, n > 2): the same refits in the same order "
            "(test_bootstrap_in_processes_equals_serial), only the speed differs") for i in (27, 28, 29, 34, 35, 41,
                                                                                             46, 47, 48, 49)},
        **{f"sparse_dc.scaling.uncertainty.x_cross_validate__mutmut_{i}": "fold labels stored as floats: `fold == f` "
           "selects the same runs" for i in (21, 23)},
        "sparse_dc.scaling.uncertainty.x_cross_validate__mutmut_31": (
            "dealing from fold -o instead of +o: the same partition of each stratum into folds (residue classes of "
            "the dealing order), numbered differently, so the same predictions"),
        **{f"sparse_dc.scaling.uncertainty.x_strata__mutmut_{i}": "reshape(-2) / reshape(None) of the 1-D inverse: "
           "numpy reads any negative size as the unknown one, and None as 'keep the shape'" for i in (8, 19)},
        **{f"sparse_dc.scaling.uncertainty.x__as_1d__mutmut_{i}": _FORMS_CONVERT for i in (3, 5)},
        "sparse_dc.scaling.uncertainty.x_bootstrap__mutmut_7": (
            "another stream multiplier: resample i of a seed is stream seed * M + i, which for i < n < M still repeats "
            "for a seed and never collides across seeds (test_bootstrap_resamples_are_reproducible_and_independent_"
            "across_seeds)"),
        **{f"sparse_dc.scaling.uncertainty.x_bootstrap__mutmut_{i}": (
            "serial refits or a process pool for another (workers, n): the same samples in the same order "
            "(test_bootstrap_in_processes_equals_serial), only the speed differs") for i in (2, 24, 25, 26)},
    },
    "scaling/forms": {
        "sparse_dc.scaling.forms.xǁChinchillaǁlog_terms__mutmut_25": _PLUS_ZERO,
        "sparse_dc.scaling.forms.xǁSparseDataConstrainedǁlog_terms__mutmut_133": _PLUS_ZERO,
    },
    "kernels/layout": {
        **{f"{_L}from_block_mask__mutmut_{i}": _CPU_ONLY for i in (7, 10, 28, 31)},
        **{f"{_L}_validate_indices__mutmut_{i}": _CPU_ONLY for i in (54, 57)},
        **{f"{_L}with_mask__mutmut_{i}": _CPU_ONLY for i in (7, 25, 29)},
        **{f"{_L}from_block_mask__mutmut_{i}": _INT32_ANYWAY for i in (23, 27, 30)},
        **{f"{_L}from_block_mask__mutmut_{i}": _TRUSTED for i in (37, 43, 46)},
        f"{_L}to__mutmut_6": _TRUSTED,
        f"{_L}_validate_indices__mutmut_104": ("bincount without minlength: slots are already in [0, nnz), and nnz "
                                               "slots with every count up to the largest equal to 1 fill all nnz"),
        **{f"{_L}with_mask__mutmut_{i}": "torch.full with the int fill -1 is int64 without dtype= too"
           for i in (24, 28)},
        f"{_L}with_mask__mutmut_32": "the 'no slot yet' sentinel -2 instead of -1: only `< 0` is asked of it",
        **{f"{_L}__init____mutmut_{i}": _CPU_ONLY for i in (121, 124)},
        **{f"{_L}with_mask__mutmut_{i}": _CPU_ONLY for i in (49, 52)},
        **{f"{_L}with_mask__mutmut_{i}": _TRUSTED for i in (70, 76, 79)},
        **{f"{_L}with_mask__mutmut_{i}": _INT32_ANYWAY for i in (77, 78)},
        f"{_L}__init____mutmut_88": ("repeat_interleave(row_len) is arange(nbr) repeated row_len times: the same "
                                     "values and dtype"),
    },
    "train/checkpoint": {
        **{f"sparse_dc.train.checkpoint.xǁCheckpointerǁnewest_intact__mutmut_{i}": _FLUSHED for i in (29, 32, 42)},
        "sparse_dc.train.checkpoint.xǁStopSignalǁ__init____mutmut_5": ("received = '' instead of None before any "
                                                                      "signal: both are falsy, all name() asks"),
        **{f"sparse_dc.train.checkpoint.xǁStopSignalǁrequested__mutmut_{i}": _ANY_NONZERO for i in (7, 10, 14, 19)},
        **{f"sparse_dc.train.checkpoint.xǁStopSignalǁrequested__mutmut_{i}": _CPU_TENSOR for i in (8, 11)},
        "sparse_dc.train.checkpoint.xǁStopSignalǁrequested__mutmut_3": ("`world_size >= 1`: an all-reduce over one "
                                                                       "rank returns its own flag, what the local "
                                                                       "branch reads; every world size > 1 reduces"),
    },
    "sparsity/layer": {
        **{f"sparse_dc.sparsity.layer.xǁSparseLinearǁ__init____mutmut_{i}": "`/` for `//` in the expected mask shape: "
           "the block size divides both dims (checked just before), so the float equals the int and the tuples "
           "compare equal" for i in (11, 12)},
        "sparse_dc.sparsity.layer.xǁMaskedLinearǁregrown_values__mutmut_2": _CPU_DEVICE,
        "sparse_dc.sparsity.layer.xǁBlockSparseLinearǁ_capture_hook__mutmut_3":
            "always `x.to(dy.dtype)`: converting a tensor already in that dtype returns it unchanged",
        **{f"sparse_dc.sparsity.layer.xǁBlockSparseLinearǁ_capture_hook__mutmut_{i}": _INDEX_CHECK
           for i in (21, 28, 29)},
        **{f"sparse_dc.sparsity.layer.xǁGrowCaptureǁscores__mutmut_{i}": "no dtype (or None) for float32: torch's "
           "default dtype, which sparse-dc never changes" for i in (4, 7)},
        **{f"sparse_dc.sparsity.layer.xǁBlockSparseLinearǁwith_revived__mutmut_{i}": "no dtype (or None) for "
           "torch.long: torch.full infers int64 from the fill value -1" for i in (7, 11)},
        **{f"sparse_dc.sparsity.layer.xǁBlockSparseLinearǁwith_revived__mutmut_{i}": _CPU_DEVICE
           for i in (8, 12, 17, 18)},
        **{f"sparse_dc.sparsity.layer.xǁBlockSparseLinearǁwith_revived__mutmut_{i}": "the slot table's fill value "
           "(+1 or -2 for -1) is never read: revived blocks are live in the new layout, so their slots are written"
           for i in (13, 14)},
        "sparse_dc.sparsity.layer.x__layout_from_buffers__mutmut_6": "validate=None for False: falsy, so the index "
                                                                     "checks are skipped all the same",
        **{f"sparse_dc.sparsity.layer.x__layout_from_buffers__mutmut_{i}": "validate=True (given or by default) "
           "for False: checks the indices of buffers this module wrote, which always pass (host syncs only)"
           for i in (12, 13)},
        **{f"sparse_dc.sparsity.layer.xǁBlockSparseLinearǁunit_magnitude__mutmut_{i}": _CPU_DEVICE
           for i in (10, 12, 14)},
    },
    "sparsity/dst": {
        **{f"sparse_dc.sparsity.dst.xǁDSTEngineǁupdate__mutmut_{i}": _CPU_DEVICE for i in (9, 19, 20)},
        "sparse_dc.sparsity.dst.xǁDSTEngineǁupdate__mutmut_131": ("stats(None) at the end of update: update has just "
                                                                  "set last_update_step = step, so the same stats"),
        **{f"sparse_dc.sparsity.dst.xǁDSTEngineǁupdate__mutmut_{i}": "bool + uint8 promotes to uint8: the same "
           "0/1/2 codes without one of the casts" for i in (56, 57)},
        "sparse_dc.sparsity.dst.x__distributed__mutmut_3": "world size >= 1: broadcast and all_reduce over a "
                                                           "one-rank group change nothing",
        **{f"sparse_dc.sparsity.dst.xǁDSTEngineǁ_regrown_values__mutmut_{i}": _STREAM_NAME for i in (5, 9, 13, 14)},
        "sparse_dc.sparsity.dst.xǁDSTEngineǁstats__mutmut_9": "a dense model's placeholder counts 2 / 2 for 1 / 1: "
                                                              "density 1 and every fraction 0 all the same",
    },
    "sparsity/topology": {
        "sparse_dc.sparsity.topology.x__lowest__mutmut_16": _SET_OF_INDICES,
        "sparse_dc.sparsity.topology.x__lowest__mutmut_18": _SET_OF_INDICES,
        "sparse_dc.sparsity.topology.x_drop_grow__mutmut_20": "n = 0 with `n < 0`: topk of 0 units drops and grows "
                                                               "nothing, the same result as the early return",
        "sparse_dc.sparsity.topology.x_drop_grow__mutmut_27": _ONE_DEVICE,
        "sparse_dc.sparsity.topology.x_drop_grow__mutmut_44": _ONE_DEVICE,
    },
    "train/config": {
        "sparse_dc.train.config.xǁDeepSpeedConfigǁvalidate__mutmut_46": _LEAF_SECTION,
        "sparse_dc.train.config.xǁOptimizerConfigǁvalidate__mutmut_64": _LEAF_SECTION,
        "sparse_dc.train.config.xǁScheduleConfigǁvalidate__mutmut_65": _LEAF_SECTION,
        "sparse_dc.train.config.xǁWandbConfigǁvalidate__mutmut_35": _LEAF_SECTION,
        **{f"sparse_dc.train.config.xǁTrainConfigǁdeepspeed_config__mutmut_{i}": _NEVER_PRINTS
           for i in (44, 46, 47, 48)},
    },
}


def source_path(module: str) -> str:
    """Path of a module inside the scratch copy (the installed package's layout)."""
    return f"sparse_dc/{module}.py"


def lay_out(module: str, tests: list[str]) -> str:
    """A fresh scratch copy for `module`: the package (kernels inside it), the tests, pytest.ini, mutmut's config."""
    work = os.path.join(SCRATCH, module.replace("/", "."))
    shutil.rmtree(work, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(os.path.join(ROOT, "sparse_dc"), os.path.join(work, "sparse_dc"), ignore=ignore)
    shutil.copytree(os.path.join(ROOT, "kernels"), os.path.join(work, "sparse_dc", "kernels"), ignore=ignore)
    shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(work, "tests"), ignore=ignore)
    for name in ("pytest.ini", "launch"):
        src = os.path.join(ROOT, name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(work, name))
    selection = "\n    ".join(t for t in tests if os.path.exists(os.path.join(ROOT, t)))
    with open(os.path.join(work, "setup.cfg"), "w", encoding="utf-8") as fh:
        fh.write(f"""[mutmut]
source_paths = sparse_dc
only_mutate = {source_path(module)}
also_copy =
    launch
    pytest.ini
pytest_add_cli_args_test_selection =
    {selection}
pytest_add_cli_args =
    -p
    no:cacheprovider
timeout_multiplier = 5.0
timeout_constant = 30.0
process_isolation = forkserver
""")
    return work


def run_env(work: str) -> dict:
    """The environment of a module's mutmut run. One thread per process: mutants run in forked processes, and a fork
    of a process whose thread pools hold locks can hang (a false timeout, counted killed). The data tests' corpus is
    prepared once per run and reused by every mutant (tests/data/conftest.py), not rebuilt per mutant; mutants of
    the writing code are still run against the tests that prepare a corpus themselves."""
    return dict(os.environ, TMPDIR=os.path.join(work, "tmp"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                SPARSE_DC_TEST_PREPARED=os.path.join(work, "prepared-corpus"))


def run_module(module: str, children: int) -> dict:
    tests = MODULES[module]
    work = lay_out(module, tests)
    # No PYTHONPATH: mutmut puts mutants/ first on sys.path itself (an entry for it, cached by the import system
    # before the folder is filled, lets the installed package win).
    env = run_env(work)
    os.makedirs(env["TMPDIR"], exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.run(["mutmut", "run", "--max-children", str(children)], cwd=work, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    with open(os.path.join(work, "mutmut-run.log"), "w", encoding="utf-8") as fh:
        fh.write(proc.stdout)
    return collect(module, work, env, round(seconds, 1), proc.returncode)


def retest(module: str, children: int) -> dict:
    """Test the last run's survivors again against the current tests (the module's code must be unchanged since):
    the tests are copied into its scratch copy and only the surviving mutants run (mutmut collects coverage for the
    new tests first)."""
    work = os.path.join(SCRATCH, module.replace("/", "."))
    with open(os.path.join(RESULTS, module.replace("/", ".") + ".json"), encoding="utf-8") as fh:
        last = json.load(fh)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for target in (os.path.join(work, "tests"), os.path.join(work, "mutants", "tests")):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(ROOT, "tests"), target, ignore=ignore)
    # the rest of the package as it is now (the tests may use it); the mutated module keeps its trampolines
    for base in (work, os.path.join(work, "mutants")):
        kept = {p: open(p, "rb").read() for p in (os.path.join(base, source_path(module)),
                                                   os.path.join(base, source_path(module)) + ".meta")
                if os.path.exists(p)}  # the mutants and their verdicts
        shutil.rmtree(os.path.join(base, "sparse_dc"))
        shutil.copytree(os.path.join(ROOT, "sparse_dc"), os.path.join(base, "sparse_dc"), ignore=ignore)
        shutil.copytree(os.path.join(ROOT, "kernels"), os.path.join(base, "sparse_dc", "kernels"), ignore=ignore)
        for path, data in kept.items():
            with open(path, "wb") as fh:
                fh.write(data)
    config = open(os.path.join(work, "setup.cfg"), encoding="utf-8").read()
    selection = "\n    ".join(t for t in MODULES[module] if os.path.exists(os.path.join(ROOT, t)))
    head, _, rest = config.partition("pytest_add_cli_args_test_selection =\n")
    rest = rest[rest.index("\npytest_add_cli_args =") + 1:]
    config = f"{head}pytest_add_cli_args_test_selection =\n    {selection}\n{rest}"
    for path in (os.path.join(work, "setup.cfg"), os.path.join(work, "mutants", "setup.cfg")):
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(config)
    env = run_env(work)
    start = time.perf_counter()
    proc = subprocess.run(["mutmut", "run", "--max-children", str(children), *last["survivors"]], cwd=work, env=env,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with open(os.path.join(work, "mutmut-retest.log"), "w", encoding="utf-8") as fh:
        fh.write(proc.stdout)
    return collect(module, work, env, round(last["seconds"] + time.perf_counter() - start, 1), proc.returncode)


def collect(module: str, work: str, env: dict, seconds: float, exit_code: int) -> dict:
    """Score a finished run in `work` against the current EQUIVALENT list and write its JSON."""
    subprocess.run(["mutmut", "export-cicd-stats"], cwd=work, env=env, check=True, capture_output=True)
    with open(os.path.join(work, "mutants", "mutmut-cicd-stats.json"), encoding="utf-8") as fh:
        counts = json.load(fh)
    listing = subprocess.run(["mutmut", "results", "--all", "true"], cwd=work, env=env, text=True,
                             capture_output=True).stdout
    status = {}
    for line in listing.splitlines():
        name, sep, verdict = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            status[name] = verdict
    listed = EQUIVALENT.get(module, {})
    # a listed mutant counts as equivalent only if it survived: one the tests kill was not equivalent after all
    equivalent = {n: r for n, r in listed.items() if status.get(n) in ("survived", "no tests")}
    stale = sorted(n for n in listed if status.get(n) in ("killed", "timeout"))
    if stale:
        print(f"{module}: listed as equivalent but killed (remove from EQUIVALENT): {', '.join(stale)}",
              file=sys.stderr)
    survivors = {}
    for name, verdict in sorted(status.items()):
        if verdict in ("survived", "no tests") and name not in equivalent:
            diff = subprocess.run(["mutmut", "show", name], cwd=work, env=env, text=True, capture_output=True).stdout
            survivors[name] = {"status": verdict, "diff": diff.strip()}
    killed = sum(v in ("killed", "timeout") for v in status.values())
    tested = len(status)
    scored = tested - len(equivalent)
    result = {"module": module, "tests": MODULES[module], "mutants": tested, "killed": killed,
              "equivalent": equivalent, "survived": len(survivors),
              "not_checked": tested - killed - len(equivalent) - len(survivors),
              "score": round(killed / scored, 4) if scored else None, "listed_equivalent_but_killed": stale,
              "raw_counts": counts, "seconds": seconds, "survivors": survivors, "mutmut_exit": exit_code}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, module.replace("/", ".") + ".json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
        fh.write("\n")
    return result


def write_table() -> str:
    rows = []
    for module in MODULES:
        path = os.path.join(RESULTS, module.replace("/", ".") + ".json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                r = json.load(fh)
            score = f"{100 * r['score']:.1f}%" if r["score"] is not None else "-"
            unchecked = r.get("not_checked", r["mutants"] - r["killed"] - len(r["equivalent"]) - r["survived"])
            rows.append(f"| {module} | {r['mutants']} | {r['killed']} | {len(r['equivalent'])} | {r['survived']} | "
                        f"{unchecked} | {score} | {r['seconds'] / 60:.0f} |")
        else:
            rows.append(f"| {module} | not run | | | | | | |")
    lines = ["# Mutation scores (mutmut, each module against its own tests)", "",
             "Score = (killed + timed out) / (mutants - equivalent). Survivors and the reasons for equivalent mutants: "
             "`mutation/<module>.json`. Re-run: `python benchmarks/mutation.py MODULE` (README, Development).", "",
             "Not checked: mutants a run stopped early never tested (they count as not killed).", "",
             "| module | mutants | killed | equivalent | survived | not checked | score | minutes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *rows, ""]
    text = "\n".join(lines)
    with open(os.path.join(ROOT, "benchmarks", "results", "mutation.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"modules to mutate (default: all of {', '.join(MODULES)})")
    parser.add_argument("--children", type=int, default=1, help="mutants tested in parallel (default 1)")
    parser.add_argument("--list", action="store_true", help="print the modules and their tests, then exit")
    parser.add_argument("--retest", action="store_true",
                        help="run the last run's surviving mutants again against the current tests")
    parser.add_argument("--rescore", action="store_true",
                        help="re-score the last run of each module (its .mutation/ folder) against EQUIVALENT")
    args = parser.parse_args(argv)
    if args.list:
        for module, tests in MODULES.items():
            print(f"{module}: {' '.join(tests)}")
        return 0
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        print(f"module {unknown[0]!r} is not one of: {', '.join(MODULES)}", file=sys.stderr)
        return 2
    if shutil.which("mutmut") is None:
        print('mutmut is not installed: pip install -c requirements/ci.txt -e ".[dev]"', file=sys.stderr)
        return 2
    for module in args.modules or list(MODULES):
        if args.retest:
            r = retest(module, args.children)
        elif args.rescore:
            with open(os.path.join(RESULTS, module.replace("/", ".") + ".json"), encoding="utf-8") as fh:
                last = json.load(fh)
            r = collect(module, os.path.join(SCRATCH, module.replace("/", ".")), dict(os.environ), last["seconds"],
                        last["mutmut_exit"])
        else:
            r = run_module(module, args.children)
        score = f"{100 * r['score']:.1f}%" if r["score"] is not None else "-"
        print(f"{module}: {r['killed']}/{r['mutants']} killed, {len(r['equivalent'])} equivalent, "
              f"{r['survived']} survived: {score} ({r['seconds'] / 60:.1f} min)", flush=True)
    print(write_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
