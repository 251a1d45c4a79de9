"""The package's own set-up, checked in a fresh interpreter, without conftest's help."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU set-up")
def test_kernels_switch_on_the_triton_interpreter_themselves():
    """conftest sets TRITON_INTERPRET for the tests; the package must not rely on that."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import os, torch\n"
        "from moe_lab.kernels import grouped_gemm, grouped_gemm_reference\n"
        "x = torch.randn(5, 4); w = torch.randn(2, 4, 3); c = torch.tensor([2, 3])\n"
        "torch.testing.assert_close(grouped_gemm(x, w, c), grouped_gemm_reference(x, w, c))\n"
        "print(os.environ['TRITON_INTERPRET'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("1")


def test_import_moe_lab_does_not_import_triton_or_the_book_harness():
    """The core library stays small: importing it pulls in neither Triton nor moe_lab.lab."""
    code = ("import sys, moe_lab, moe_lab.layer, moe_lab.parallel\n"
            "print('triton' in sys.modules, any(m.startswith('moe_lab.lab') for m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
