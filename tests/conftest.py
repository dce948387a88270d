"""Session setup shared by all tests.

Without a CUDA device the Triton kernels run in Triton's CPU interpreter.
TRITON_INTERPRET is read when kernels are decorated (at import), so it is set
here, before any test module imports ``nbp_kernels.ops``; a value already in
the environment wins.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for a module: on a shared 2-core runner oversubscribed
    OpenMP threads are far slower. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
