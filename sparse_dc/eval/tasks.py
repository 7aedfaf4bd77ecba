"""Harness tasks: offline only, found by name, and every way a task can fail to load said in one line.

`sparse-dc eval` never downloads: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set (unless the user set them) before
`datasets` is imported, so a task reads a dataset already in the Hugging Face cache or local files named by a
task YAML, e.g. a folder passed as --include-path holding

    task: my_task
    dataset_path: json
    dataset_kwargs: {data_files: {test: /data/my_task.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: choices
    doc_to_target: label
    metric_list: [{metric: acc}]
"""
from __future__ import annotations

import difflib
import os
from typing import Any

from sparse_dc.errors import SparseDCError

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class TaskError(SparseDCError):
    """A task that cannot be evaluated here: unknown name, data not on this machine, unreadable data."""


def go_offline() -> None:
    """No hub access at run time (call before `datasets` or `lm_eval` is imported: both read these at import);
    then check that the harness is installed."""
    for name in OFFLINE_VARIABLES:
        os.environ.setdefault(name, "1")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise SparseDCError("sparse-dc eval needs lm-evaluation-harness: pip install 'sparse-dc[eval]'") from None


def task_manager(names: list[str], include_path: str | None) -> Any:
    """A TaskManager that knows `names`. With --include-path covering every name, only that folder is indexed:
    indexing the harness's ~15,000 built-in task files takes ~20 s on a small machine."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not os.path.isdir(include_path):
            raise TaskError(f"--include-path {include_path}: no such folder; expected a folder of task YAML files")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    return TaskManager(include_path=include_path)


def check_tasks(manager: Any, names: list[str]) -> dict[str, set[str]]:
    """Load each task once (which reads its data) so that a failure names its task in one line; returns each
    name's output types (loglikelihood, multiple_choice, generate_until...)."""
    kinds = {}
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise TaskError(f"--tasks {name}: no such lm-eval task, group or tag{hint} (custom tasks: a folder of "
                            "task YAMLs passed as --include-path)")
        try:
            loaded = manager.load([name])
        except Exception as exc:  # the harness and `datasets` raise many types; each becomes one line
            raise data_error(name, exc) from None
        kinds[name] = {task.get_config("output_type") for task in loaded["tasks"].values()}
    return kinds


def data_error(name: str, exc: BaseException) -> TaskError:
    """The one-line error for a task whose data could not be loaded: not on this machine, or unreadable."""
    root = exc
    while root.__cause__ is not None or root.__context__ is not None:  # `datasets` wraps the parser's own error
        root = root.__cause__ or root.__context__
    text = f"{exc}: {root}" if root is not exc else str(exc)
    detail = " ".join(text.split())[:400] or type(exc).__name__
    if _is_fetch_failure(exc):
        return TaskError(
            f"task {name}: its data is not on this machine and sparse-dc eval does not download ({detail}); point "
            "the task at local files (a task YAML with dataset_path: json and dataset_kwargs: {data_files: ...} in a "
            "folder passed as --include-path DIR), or fill the Hugging Face datasets cache (HF_DATASETS_CACHE) on a "
            "machine with network access first")
    return TaskError(f"task {name}: its data could not be read ({type(exc).__name__}: {detail}); expected the "
                     "files its task YAML names (dataset_kwargs.data_files) to exist and parse")


def _is_fetch_failure(exc: BaseException) -> bool:
    """A dataset that would have to come from the hub (offline mode refuses, or the network is not there)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names = {cls.__name__ for cls in type(exc).__mro__}
        if names & {"ConnectionError", "OfflineModeIsEnabled", "DatasetNotFoundError", "LocalEntryNotFoundError",
                    "RepositoryNotFoundError"}:
            return True
        exc = exc.__cause__ or exc.__context__
    return False
