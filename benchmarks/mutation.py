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
                    "tests/data/test_loader_properties.py"],
    "data/shards": ["tests/data/test_shards.py", "tests/data/test_loader.py", "tests/data/test_prepare_errors.py",
                    "tests/data/test_prepare.py"],
    "sparsity/topology": ["tests/sparsity/test_sparsity_dst.py", "tests/sparsity/test_sparsity_recipe.py",
                          "tests/sparsity/test_sparsity_properties.py"],
    "sparsity/dst": ["tests/sparsity/test_sparsity_dst.py", "tests/sparsity/test_sparsity_recipe.py"],
    "sparsity/layer": ["tests/sparsity/test_sparsity_layer.py", "tests/sparsity/test_sparsity_dst.py",
                       "tests/sparsity/test_sparsity_recipe.py"],
    "kernels/layout": ["tests/kernels/test_kernel_layout.py", "tests/kernels/test_layout_errors.py",
                       "tests/kernels/test_layout_properties.py", "tests/kernels/test_kernel_reference.py"],
    "train/config": ["tests/train/test_train_config.py", "tests/test_config.py"],
    "train/checkpoint": ["tests/train/test_train_units.py", "tests/train/test_train_checkpoint.py"],
    "scaling/forms": ["tests/scaling/test_forms.py", "tests/scaling/test_fit.py"],
    "scaling/fit": ["tests/scaling/test_fit.py", "tests/scaling/test_forms.py"],
    "scaling/uncertainty": ["tests/scaling/test_uncertainty.py"],
}

# Mutants that cannot change behaviour, by mutmut name (module -> name -> reason); the score leaves them out.
_LEAF_SECTION = ("Config.validate(path) only recurses into sub-sections, and this section has none: the path it "
                 "is given is never read")
_NEVER_PRINTS = "steps_per_print: any value beyond the run's step count keeps DeepSpeed's step prints off"
_SET_OF_INDICES = "topk's indices are used as a set (to index a mask): their order does not matter"
_ONE_DEVICE = ("`.to(mask.device)` of indices already on the mask's device: a no-op here, where the tests run on the "
               "CPU (it matters on a GPU, where tests/sparsity's GPU-free suite cannot see it)")
_CPU_DEVICE = ("a `device=` or `.to(device)` that places a tensor where it already is on a one-device CPU run: a "
               "no-op here (it matters on a GPU, which tests/sparsity's GPU-free suite cannot see)")
_STREAM_NAME = ("the name in the regrow stream's key (changed, dropped or None): still a reproducible stream keyed by "
                "(seed, step, layer) and independent of the other keyed streams ('paths')")
_INDEX_CHECK = ("check_indices None, True or left at its default (True) instead of False: only adds a range check "
                "of block indices that arm_scores built from this layout, which always passes (a host sync, never "
                "a different result)")
EQUIVALENT: dict[str, dict[str, str]] = {
    "sparsity/layer": {
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


def run_module(module: str, children: int) -> dict:
    tests = MODULES[module]
    work = lay_out(module, tests)
    # No PYTHONPATH: mutmut puts mutants/ first on sys.path itself (an entry for it, cached by the import system
    # before the folder is filled, lets the installed package win). One thread per process: mutants run in forked
    # processes, and a fork of a process whose thread pools hold locks can hang (a false timeout, counted killed).
    env = dict(os.environ, TMPDIR=os.path.join(work, "tmp"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
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
    env = dict(os.environ, TMPDIR=os.path.join(work, "tmp"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
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
    equivalent = EQUIVALENT.get(module, {})
    survivors = {}
    for name, verdict in sorted(status.items()):
        if verdict in ("survived", "no tests") and name not in equivalent:
            diff = subprocess.run(["mutmut", "show", name], cwd=work, env=env, text=True, capture_output=True).stdout
            survivors[name] = {"status": verdict, "diff": diff.strip()}
    killed = sum(v in ("killed", "timeout") for v in status.values())
    tested = len(status)
    scored = tested - sum(n in status for n in equivalent)
    result = {"module": module, "tests": MODULES[module], "mutants": tested, "killed": killed,
              "equivalent": {n: r for n, r in equivalent.items() if n in status},
              "survived": len(survivors), "score": round(killed / scored, 4) if scored else None,
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
            rows.append(f"| {module} | {r['mutants']} | {r['killed']} | {len(r['equivalent'])} | {r['survived']} | "
                        f"{score} | {r['seconds'] / 60:.0f} |")
        else:
            rows.append(f"| {module} | not run | | | | | |")
    lines = ["# Mutation scores (mutmut, each module against its own tests)", "",
             "Score = (killed + timed out) / (mutants - equivalent). Survivors and the reasons for equivalent mutants: "
             "`mutation/<module>.json`. Re-run: `python benchmarks/mutation.py MODULE` (README, Development).", "",
             "| module | mutants | killed | equivalent | survived | score | minutes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |", *rows, ""]
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
