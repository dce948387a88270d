"""NBP token generation (the demo model, or ``--model k600``): 1 vs 2 threads per OpenMP wait policy.

Policies (``--policies``): ``passive`` (``OMP_WAIT_POLICY=PASSIVE``), ``default``
(libgomp's long spin: torch imported before nbp, so nbp's choice comes too late)
and ``spincount-N`` (``GOMP_SPINCOUNT=N``, what nbp sets on an idle machine).
libgomp reads the policy once, when torch loads it, so each policy runs in its own
child process, the policies alternated twice (the load drifts).
In each child the two thread counts are timed round-robin, one clip (latency) and
a batch of 16 held-out clips. Medians and bests, with the load average. Writes
benchmarks/results/cpu_threads_demo_<machine>.json.

    python benchmarks/ablations/cpu_threads_demo.py --repeats 5
    python benchmarks/ablations/cpu_threads_demo.py --model k600 --policies spincount-3000 spincount-10000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
POLICIES = ("passive", "default", "spincount-3000", "spincount-10000", "spincount-30000")


def policy_env(policy: str) -> dict[str, str]:
    """The process environment of a child timing ``policy`` (POLICIES)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif policy.startswith("spincount-"):
        env["GOMP_SPINCOUNT"] = policy.removeprefix("spincount-")
    return env


def _k600_jobs() -> dict:
    """NBP generation at the K600 shape (6 x 384, vocabulary 64000, 512 + 768 tokens,
    top-k 16000, top-p 0.9, random weights) at 1 and 2 threads."""
    import torch

    from nbp.commands.bench import bench_config, frame_prediction_shape, random_model
    from nbp.generate import FastGenerator

    cfg = bench_config("k600-base", layers=6, width=384)
    gen = FastGenerator(random_model(cfg))
    given, new = frame_prediction_shape(cfg)
    ids = torch.randint(cfg.video_offset, cfg.vocab_size, (1, given),
                        generator=torch.Generator().manual_seed(0))

    def job(threads):
        def run():
            torch.set_num_threads(threads)
            gen.generate_tokens(ids, new, top_k=16000, top_p=0.9,
                                generator=torch.Generator().manual_seed(0))
        return run
    return {f"{t}t-k600": job(t) for t in (1, 2)}


def child(policy: str, repeats: int, model: str = "demo") -> dict:
    """Timings in this process (its policy fixed by what was imported first)."""
    if policy == "default":
        import torch   # before nbp: libgomp loads with its own default
    at_load = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    import nbp  # noqa: F401
    import statistics

    import torch

    from nbp.commands.bench import time_interleaved
    from nbp.demo import heldout_clips, load_demo, prediction_prompt
    from nbp.generate import FastGenerator

    if model == "k600":
        fns = _k600_jobs()
    else:
        models = load_demo()
        gen = FastGenerator(models.model("nbp"), models.tokenizer, device="cpu")
        video, labels = heldout_clips(16)
        prompts = {n: prediction_prompt(gen, video[:n], labels[:n]) for n in (1, 16)}

        def job(threads, n):
            prompt, prefix = prompts[n]

            def run():
                torch.set_num_threads(threads)
                gen.generate_tokens(prompt, gen.config.video_len - prefix.shape[1],
                                    cond_len=gen.config.cond_len, mode="nbp", do_sample=False)
            return run
        fns = {f"{t}t-{n}clip": job(t, n) for t in (1, 2) for n in (1, 16)}
    load = os.getloadavg()[0]
    times = time_interleaved(fns, repeats)
    return {"policy": policy, "wait_policy_when_torch_loaded": at_load,
            "load_avg_1m_before": load, "load_avg_1m_after": os.getloadavg()[0],
            "rows": [{"method": k, "median_ms": statistics.median(v) * 1e3,
                      "best_ms": min(v) * 1e3, "times_ms": [x * 1e3 for x in v]}
                     for k, v in times.items()]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", choices=POLICIES, help=argparse.SUPPRESS)
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=["passive", "default"])
    p.add_argument("--model", choices=["demo", "k600"], default="demo",
                   help="the demo model, or NBP generation at the K600 shape (random weights)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="appended to the result file's name")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.repeats, args.model)))
        return 0
    runs = []
    for policy in args.policies * 2:   # alternated: the load drifts
        out = subprocess.run([sys.executable, __file__, "--child", policy, "--repeats",
                              str(args.repeats), "--model", args.model], env=policy_env(policy),
                             check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "rows"}),
              *(f"{r['method']}: median {r['median_ms']:.1f} ms, best {r['best_ms']:.1f} ms"
                for r in runs[-1]["rows"]), sep="\n  ")
    from ablation_args import write_result
    from nbp.commands.bench import machine_info, machine_tag
    from nbp_kernels.cpu_build import cpu_isa

    info = dict(machine_info("cpu"), isa=cpu_isa()[0])
    result = {"what": __doc__.split("\n\n")[0], "model": args.model, "machine": info,
              "runs": runs}
    name = "demo" if args.model == "demo" else "k600"
    write_result(args.out / f"cpu_threads_{name}_{machine_tag(info)}{args.tag}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
