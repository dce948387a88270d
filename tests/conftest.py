"""Session setup shared by all tests.

Without a CUDA device the Triton kernels run in Triton's CPU interpreter.
TRITON_INTERPRET is read when kernels are decorated (at import), so it is set
here, before any test module imports ``nbp_kernels.ops``; a value already in
the environment wins.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
