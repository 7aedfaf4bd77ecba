"""Fixtures of the reproduce tests."""
import pytest
from synthetic_ledger import write_synthetic


@pytest.fixture
def synthetic():
    return write_synthetic
