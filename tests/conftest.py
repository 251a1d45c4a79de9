"""Test-session set-up shared by every test module."""

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported; without a GPU the kernels can only
# run in its interpreter, so set it before any test module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
