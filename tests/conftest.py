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


@pytest.fixture
def interrupt_when_logged():
    """interrupt(proc, log, lines=3) -> (stdout, stderr): once ``log`` (a training run's
    log.jsonl) holds ``lines`` lines, SIGINT ``proc``'s whole process group, as a terminal's
    Ctrl-C does (``proc`` started with ``start_new_session=True``), and collect its output."""
    import signal
    import time

    def interrupt(proc, log, lines: int = 3, timeout: float = 240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and len(log.read_text().splitlines()) >= lines:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        return proc.communicate(timeout=120)
    return interrupt


@pytest.fixture
def assert_same_tokenizer():
    """check(a, b): two VideoTokenizers hold equal weights and encode/decode a clip alike."""
    def check(a, b):
        sd, sd2 = a.state_dict(), b.state_dict()
        assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
        video = torch.rand(1, 3, 5, 16, 8)
        codes = a.encode(video)
        assert torch.equal(b.encode(video), codes)
        assert torch.equal(b.decode(codes), a.decode(codes))
    return check
