"""User-facing errors. The CLI prints their one-line message and exits non-zero, with no traceback."""


class SparseDCError(ValueError):
    """Base of every error caused by user input (config, files, budgets, shapes); the message is one line."""
