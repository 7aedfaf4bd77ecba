"""User-facing errors. The CLI prints their one-line message and exits non-zero, with no traceback."""
from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

# Below this much free space a failed write is taken for a full disk: torch.save reports one as a bare
# "[enforce fail at inline_container.cc] unexpected pos" RuntimeError, without errno.
_NEARLY_FULL_BYTES = 64 << 20
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class SparseDCError(ValueError):
    """Base of every error caused by user input (config, files, budgets, shapes); the message is one line."""


class DiskFull(SparseDCError):
    """A write failed because its filesystem (or quota) is full."""


def mount_point(path: str) -> str:
    """The mount point holding `path` (or the nearest existing parent of it)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def is_disk_full(exc: BaseException, path: str) -> bool:
    """Whether `exc`, raised while writing under `path`, comes from a full filesystem."""
    if isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS:
        return True
    if not isinstance(exc, RuntimeError):  # an OSError says what it is
        return False
    try:
        return shutil.disk_usage(mount_point(path)).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def disk_full(path: str, consequence: str = "") -> DiskFull:
    where = mount_point(path)
    free = shutil.disk_usage(where).free
    return DiskFull(f"no space left on {where} ({free / 2**20:.1f} MiB free) writing {path}"
                    + (f": {consequence}" if consequence else ""))


@contextmanager
def reporting_disk_full(path: str, consequence: str = "") -> Iterator[None]:
    """Turn a full-disk failure of the writes inside into one DiskFull line naming `path` (others propagate)."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if is_disk_full(exc, path):
            raise disk_full(path, consequence) from None
        raise
