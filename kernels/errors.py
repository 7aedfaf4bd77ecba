"""The one error type of `sparse_dc.kernels`: bad shapes, dtypes, devices, block sizes or indices."""
from sparse_dc.errors import SparseDCError


class BlockSparseError(SparseDCError):
    """A block-sparse op or layout got input it cannot use. A ValueError; the message is one line
    in the "Expected X. Got Y." style."""


def check(ok: bool, expected: str, got: str) -> None:
    """Raise BlockSparseError("Expected {expected}. Got {got}.") unless `ok`."""
    if not ok:
        raise BlockSparseError(f"Expected {expected}. Got {got}.")
