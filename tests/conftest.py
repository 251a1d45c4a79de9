"""Test-session set-up shared by every test module."""

import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported; without a GPU the kernels can only
# run in its interpreter, so set it before any test module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
