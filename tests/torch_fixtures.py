"""Fixtures shared by the torch-path tests (import them into a test module to use them)."""

from __future__ import annotations

import pytest

from hold_export.parity import one_torch_thread
from hold_mlx.data import load_dataset


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every test of the importing module runs torch on one CPU thread (see one_torch_thread)."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits: the smallest real image dataset."""
    return load_dataset("digits")
