"""FastGenerator shared between threads: every call returns what it returns alone.

A generator's static KV cache and captured decode steps are per-generator state;
its public methods serialise on a lock (issue 18, item 3). Without the lock two
threads overwrite each other's cache rows and step buffers: wrong tokens, or a
size mismatch when their batch sizes differ.
"""
from __future__ import annotations

import threading

import pytest
import torch

from nbp.demo import condition_ids, heldout_clips, load_demo
from nbp.generate import FastGenerator

pytestmark = pytest.mark.usefixtures("one_thread")

THREADS = 4
CALLS = 3          # per thread: later calls reuse (or resize) a cache another thread just used
NEW_TOKENS = 192   # 24 decode steps of the demo NBP model (L = 8)
JOIN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def demo():
    try:
        return load_demo()
    except (OSError, ValueError) as e:
        pytest.skip(f"no demo assets: {e}")


def _requests(model) -> list[dict]:
    """One request per (thread, call): batch sizes differ, so the cache is resized between calls."""
    out = []
    for t in range(THREADS):
        for c in range(CALLS):
            i = t * CALLS + c
            classes = [(i + j) % 12 for j in range(1 + i % 3)]
            sampling = (dict(do_sample=False) if i % 2 == 0 else
                        dict(top_k=5, seed=1000 + i))
            out.append(dict(ids=condition_ids(model, classes), **sampling))
    return out


def _run(gen: FastGenerator, req: dict) -> torch.Tensor:
    kwargs = {k: v for k, v in req.items() if k not in ("ids", "seed")}
    if "seed" in req:
        kwargs["generator"] = torch.Generator().manual_seed(req["seed"])
    return gen.generate_tokens(req["ids"], NEW_TOKENS, cond_len=1, **kwargs)


def _in_threads(jobs: list) -> list:
    """Run the callables of ``jobs`` (a list per thread) in THREADS threads started together;
    returns their results (or the exception each raised) in the order of ``jobs``."""
    results: list = [None] * sum(len(j) for j in jobs)
    start = threading.Barrier(len(jobs))

    def worker(first: int, calls: list) -> None:
        start.wait()
        for k, call in enumerate(calls):
            try:
                results[first + k] = call()
            except Exception as e:   # reported per call by the caller's assertion
                results[first + k] = e

    firsts = [sum(len(j) for j in jobs[:i]) for i in range(len(jobs))]
    threads = [threading.Thread(target=worker, args=(f, j)) for f, j in zip(firsts, jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=JOIN_TIMEOUT_S)
    hung = [i for i, t in enumerate(threads) if t.is_alive()]
    assert not hung, f"threads {hung} still running after {JOIN_TIMEOUT_S} s (deadlock?)"
    return results


def _assert_same(got: list, want: list) -> None:
    errors = [f"call {i}: {r!r}" for i, r in enumerate(got) if isinstance(r, Exception)]
    assert not errors, errors
    differ = [i for i, (g, w) in enumerate(zip(got, want)) if not torch.equal(g, w)]
    assert not differ, f"calls {differ} of {len(want)} differ from the single-thread result"


def test_four_threads_share_one_generator(demo):
    gen = FastGenerator(demo.nbp)
    reqs = _requests(demo.nbp)
    want = [_run(gen, r) for r in reqs]
    jobs = [[lambda r=r: _run(gen, r) for r in reqs[t * CALLS:(t + 1) * CALLS]]
            for t in range(THREADS)]
    _assert_same(_in_threads(jobs), want)
    assert "thread" in FastGenerator.__doc__   # the rule is stated where users read it


def test_two_generators_share_one_model(demo):
    gens = [FastGenerator(demo.nbp) for _ in range(2)]
    reqs = _requests(demo.nbp)[:2 * CALLS]
    want = [_run(gens[0], r) for r in reqs]
    jobs = [[lambda r=r, g=g: _run(g, r) for r in reqs[t * CALLS:(t + 1) * CALLS]]
            for t, g in enumerate(gens)]
    _assert_same(_in_threads(jobs), want)


def test_video_tasks_share_one_generator(demo):
    """predict_frames, most_likely_class and generate_video interleaved with token requests;
    predict_frames and generate_video call generate_tokens holding the lock (reentrant)."""
    gen = FastGenerator(demo.nbp, demo.tokenizer)
    clips, labels = heldout_clips(2)
    tasks = [
        lambda: gen.predict_frames(clips, class_ids=labels, do_sample=False),
        lambda: gen.most_likely_class(clips),
        lambda: gen.generate_video(class_ids=[3], top_k=5,
                                   generator=torch.Generator().manual_seed(7)),
        lambda: _run(gen, dict(ids=condition_ids(demo.nbp, [4, 5, 6]), do_sample=False)),
    ]
    want = [task() for task in tasks for _ in range(2)]
    _assert_same(_in_threads([[task, task] for task in tasks]), want)

