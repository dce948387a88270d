"""GPU table of FastGenerator (issue 4): decode step vs the memory floor, frames/s.

    python3 benchmarks/generate_table.py --out DIR          # CUDA: k600-base, bf16
    python3 benchmarks/generate_table.py --quick --out DIR  # the same, fewer repeats
    python3 benchmarks/generate_table.py --tiny --out DIR   # smoke run (tiny preset, any device)

k600-base shape (24 layers, 16 heads x 96, width 1536, vocab 64000, L = 16),
random weights, bf16, top-k 16000 / top-p 0.9:

* decode step: one NBP step (16 tokens, sampled; greedy alongside) at the end
  of a K600-length sequence (1280 positions cached), batch 1 and 8: the
  captured CUDA graph replayed, timed with CUDA events (median). The floor is
  the bytes a step must move, over the measured device copy bandwidth: every
  weight the step reads (all parameters except the embedding tables, of which
  only the fed rows are gathered) plus every cached key and value;
* frame prediction, autoregressive part: 512 given tokens, 768 new, batch 1,
  NBP and NTP (mode="ntp") timed round-robin; frames/s = 12 / seconds;
* the whole job: ``FastGenerator.predict_frames`` with the published-size
  tokenizer (preset "magvit2", random weights, bf16): encode the 5 given frames
  [1, 3, 5, 128, 128], generate, decode all 17 frames; frames/s = 12 / seconds.

Targets (issue 4, H100): step <= 1.4x floor at batch 1; batch 8 step <= 1.3x
batch 1; >= 300 frames/s autoregressive; >= 100 frames/s whole job. Writes
DIR/generate_<card>.md and .json (atomically) and prints the markdown.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from harness import copy_bandwidth, gpu_table_device, write_table
from nbp.commands.bench import (bench_config, frame_prediction_shape, machine_info, median, ntp_vs_nbp,
                                random_model, time_interleaved)
from nbp.generate import FastGenerator

TARGETS = {"step_over_floor_b1": 1.4, "b8_over_b1": 1.3, "ar_frames_per_s": 300,
           "job_frames_per_s": 100}
_EMBEDDING_TABLES = ("tok_emb.weight", "pos_emb")   # gathered by row, not read whole


def settings(tiny: bool, quick: bool = False) -> dict:
    """Shapes and repeat counts of a run (--tiny: a seconds-long smoke run of every code path;
    --quick: the full shapes with fewer repeats, for the first GPU contact's time share)."""
    base = dict(device=gpu_table_device("generate_table.py", tiny), tiny=tiny, top_p=0.9)
    if tiny:
        return base | dict(preset="tiny", tokenizer="tiny", dtype=torch.float32, batches=(1, 2),
                           top_k=32, step_iters=5, repeats=2, bw_bytes=1 << 24)
    return base | dict(preset="k600-base", tokenizer="magvit2", dtype=torch.bfloat16,
                       batches=(1, 8), top_k=16000, step_iters=50 if quick else 200,
                       repeats=2 if quick else 5, bw_bytes=1 << 30)


def _ids(cfg, batch: int, length: int, device) -> torch.Tensor:
    """Random video ids int64 [batch, length] (model id space)."""
    g = torch.Generator().manual_seed(batch)
    return (torch.randint(0, cfg.codebook_size, (batch, length), generator=g)
            + cfg.video_offset).to(device)


@torch.no_grad()
def step_ms(gen: FastGenerator, step, cached: int, iters: int) -> float:
    """Median ms of one decode step that ends with ``cached`` positions in the cache.

    CUDA: replays of the step's captured graph between CUDA events (the cache
    lengths are reset before each interval, outside it). Elsewhere: eager runs,
    wall clock.
    """
    seq_lens = gen.cache.seq_lens
    start = torch.full_like(seq_lens, cached - step.n)
    if gen.device.type != "cuda":
        times = []
        for _ in range(iters + 1):
            seq_lens.copy_(start)
            t0 = time.perf_counter()
            step.run(None, cached)
            times.append(time.perf_counter() - t0)
        return 1e3 * median(times[1:])
    if step.graph is None:
        raise RuntimeError("the decode step was not captured in a CUDA graph")
    for _ in range(3):
        seq_lens.copy_(start)
        step.graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]
    for a, b in events:
        seq_lens.copy_(start)
        a.record()
        step.graph.replay()
        b.record()
    torch.cuda.synchronize(gen.device)
    return median([a.elapsed_time(b) for a, b in events])


def step_bytes(model, batch: int, n: int, cached: int) -> dict:
    """Bytes one decode step must move: weights read, fed embedding rows, cached K and V."""
    cfg = model.config
    elt = next(model.parameters()).element_size()
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                  if name not in _EMBEDDING_TABLES)
    rows = 2 * batch * n * cfg.n_embd * elt
    kv = 2 * cfg.n_layer * batch * cfg.n_head * cached * cfg.head_dim * elt
    return {"weights": weights, "embedding_rows": rows, "kv_cache": kv, "total": weights + rows + kv}


def decode_row(s: dict, model, bandwidth: float, backend: str, batch: int) -> dict:
    """Sampled and greedy step ms of one (backend, batch), the floor and their ratios."""
    cfg = model.config
    given, new = frame_prediction_shape(cfg)
    cached, L = given + new, cfg.block_size
    gen = FastGenerator(model, device=s["device"], backend=backend)
    ids = _ids(cfg, batch, given, s["device"])
    row = {"backend": backend, "batch": batch, "cached": cached, "tokens_per_step": L}
    for kind, sampling in (("sampled", dict(top_k=s["top_k"], top_p=s["top_p"])),
                           ("greedy", dict(do_sample=False))):
        before = {id(st) for st in gen._steps.values()}
        gen.generate_tokens(ids, new, generator=torch.Generator(gen.device).manual_seed(0),
                            **sampling)   # builds (and on CUDA captures) the step
        step = next(st for st in gen._steps.values() if id(st) not in before and st.n == L)
        row[f"{kind}_ms"] = step_ms(gen, step, cached, s["step_iters"])
    row["bytes"] = step_bytes(model, batch, L, cached)
    row["floor_ms"] = 1e3 * row["bytes"]["total"] / bandwidth
    row["sampled_over_floor"] = row["sampled_ms"] / row["floor_ms"]
    row["greedy_over_floor"] = row["greedy_ms"] / row["floor_ms"]
    return row


def decode_rows(s: dict, model, bandwidth: float) -> list[dict]:
    """Rows for backend "auto" (what FastGenerator runs by default; the targets are judged
    on it) and, on CUDA, each usable explicit backend, at every batch size."""
    from nbp_kernels.registry import backend_status

    device = s["device"]
    backends = ["auto"] + [b for b in ("triton", "cuda")
                           if device.type == "cuda" and backend_status(b, device)[0]]
    rows = []
    for backend in backends:
        for batch in s["batches"]:
            try:
                row = decode_row(s, model, bandwidth, backend, batch)
            except Exception as e:  # an explicit backend failing must not lose the table
                if backend == "auto":
                    raise
                print(f"decode {backend} batch {batch}: {type(e).__name__}: {e}", flush=True)
                continue
            rows.append(row)
            print(f"decode {backend} batch {batch}: sampled {row['sampled_ms']:.3f} ms, greedy "
                  f"{row['greedy_ms']:.3f} ms, floor {row['floor_ms']:.3f} ms", flush=True)
    return rows


def job_rows(s: dict, model) -> dict:
    """Seconds of predict_frames (NBP, NTP) and of the tokenizer alone, timed round-robin."""
    from nbp.tokenizer import TokenizerConfig, VideoTokenizer

    cfg, device = model.config, s["device"]
    tcfg = TokenizerConfig.from_preset(s["tokenizer"])
    with torch.device(device):
        torch.manual_seed(0)
        tok = VideoTokenizer(tcfg).to(dtype=s["dtype"]).eval()
    gen = FastGenerator(model, tok, device=device)
    given_frames = 1 + 1 * tcfg.factors[0]   # the first 2 latent frames
    _, H, W = tcfg.video_shape(*cfg.latent_shape)
    video = torch.rand(1, 3, given_frames, H, W, device=device,
                       generator=torch.Generator(device).manual_seed(0))
    codes = torch.randint(0, tcfg.codebook_size, (1, *cfg.latent_shape), device=device,
                          generator=torch.Generator(device).manual_seed(0))
    sampling = dict(top_k=s["top_k"], top_p=s["top_p"])

    def predict(mode):
        return lambda: gen.predict_frames(
            video, given_frames, mode=mode, generator=torch.Generator(device).manual_seed(0),
            **sampling)

    fns = {"nbp": predict("nbp"), "ntp": predict("ntp"),
           "tokenizer": lambda: (tok.encode(video), tok.decode(codes))}
    times = time_interleaved(fns, s["repeats"], device)
    frames = (cfg.latent_shape[0] - 2) * tcfg.factors[0]
    out = {"tokenizer_preset": s["tokenizer"], "given_frames": given_frames,
           "decoded_frames": tcfg.video_shape(*cfg.latent_shape)[0], "new_frames": frames}
    for name, ts in times.items():
        out[name] = {"seconds": median(ts), "times": ts, "frames_per_s": frames / median(ts)}
    return out


def verdicts(result: dict) -> list[dict]:
    """Each issue-4 target: the measured value, the bound and met/missed."""
    dec = {r["batch"]: r for r in result["decode"] if r["backend"] == "auto"}
    b1, bn = dec[min(dec)], dec[max(dec)]
    checks = [
        ("decode step (sampled) / floor, batch 1", b1["sampled_over_floor"], "<=",
         "step_over_floor_b1"),
        (f"batch {bn['batch']} step / batch 1 step (sampled)",
         bn["sampled_ms"] / b1["sampled_ms"], "<=", "b8_over_b1"),
        ("autoregressive NBP frames/s (12-frame K600)",
         result["autoregressive"]["nbp"]["frames_per_s"], ">=", "ar_frames_per_s"),
        ("whole job NBP frames/s (tokenizer encode + decode)",
         result["job"]["nbp"]["frames_per_s"], ">=", "job_frames_per_s"),
    ]
    out = []
    for what, value, op, key in checks:
        bound = TARGETS[key]
        ok = value <= bound if op == "<=" else value >= bound
        status = "n/a (--tiny)" if result["tiny"] else ("met" if ok else "MISSED")
        out.append({"target": what, "value": value, "op": op, "bound": bound, "status": status})
    return out


def decode_backends(model, device, dtype) -> dict:
    """The backend ``backend="auto"`` runs the decode attention with, for L = block and L = 1
    (from nbp_kernels/tuning.json when gpu_check.sh's CUDA steps wrote it, else triton)."""
    from nbp_kernels.registry import resolved_backend

    cfg = model.config
    return {f"L={n}": resolved_backend("block_decode_attention", device=device, dtype=dtype,
                                       head_dim=cfg.head_dim, block_size=n)
            for n in (cfg.block_size, 1)}


def _f(x: float, spec: str = ".3f") -> str:
    return format(x, spec)


def markdown(result: dict) -> str:
    m, dec = result["machine"], result["decode"]
    lines = [f"# FastGenerator on {result['device_name']} ({result['preset']}, {result['dtype']}, "
             f"random weights)", "",
             f"torch {m['torch']}, {m['cpu']} ({m['cpu_cores']} cores), created {result['created']}; "
             f"top-k {result['top_k']}, top-p {result['top_p']}; decode attention backend "
             f"(auto): {', '.join(f'{k} {v}' for k, v in result['decode_backends'].items())}."
             + (" **--tiny smoke run: not a measurement of the k600-base shape.**"
                if result["tiny"] else ""), "",
             f"## Decode step ({dec[0]['tokens_per_step']} tokens, {dec[0]['cached']} cached; "
             f"{result['step_timing']}, median)", "",
             f"Floor = bytes moved / measured copy bandwidth "
             f"({result['copy_bandwidth_gbps']:.0f} GB/s); bytes = weights read "
             f"(embedding tables excluded, fed rows counted) + cached K and V.", "",
             "| backend | batch | sampled ms | greedy ms | floor ms | GB moved | sampled / floor "
             "| greedy / floor |", "|---|---|---|---|---|---|---|---|"]
    for r in dec:
        lines.append(f"| {r['backend']} | {r['batch']} | {_f(r['sampled_ms'])} | {_f(r['greedy_ms'])} | "
                     f"{_f(r['floor_ms'])} | {r['bytes']['total'] / 1e9:.3f} | "
                     f"{r['sampled_over_floor']:.2f}x | {r['greedy_over_floor']:.2f}x |")
    auto = [r for r in dec if r["backend"] == "auto"]
    b1, bn = auto[0], auto[-1]
    lines += ["", f"auto: batch {bn['batch']} / batch 1: sampled {bn['sampled_ms'] / b1['sampled_ms']:.2f}x, "
              f"greedy {bn['greedy_ms'] / b1['greedy_ms']:.2f}x; the floors' ratio (a step at "
              f"the floor at both sizes) is {bn['floor_ms'] / b1['floor_ms']:.2f}x.", ""]
    ar, job = result["autoregressive"], result["job"]
    lines += [f"## Frame prediction, batch 1 ({job['new_frames']} new frames; "
              f"whole job: tokenizer {job['tokenizer_preset']} encodes {job['given_frames']} "
              f"frames, decodes {job['decoded_frames']})", "",
              "| method | steps | autoregressive s | frames/s | whole job s | frames/s |",
              "|---|---|---|---|---|---|"]
    for name in ("nbp", "ntp"):
        lines.append(f"| {name} | {ar[name]['steps']} | {_f(ar[name]['seconds'], '.4f')} | "
                     f"{ar[name]['frames_per_s']:.1f} | {_f(job[name]['seconds'], '.4f')} | "
                     f"{job[name]['frames_per_s']:.1f} |")
    lines += [f"| tokenizer only | - | - | - | {_f(job['tokenizer']['seconds'], '.4f')} | - |", "",
              "## Targets (issue 4)", "", "| target | value | bound | status |", "|---|---|---|---|"]
    for v in result["verdicts"]:
        lines.append(f"| {v['target']} | {v['value']:.2f} | {v['op']} {v['bound']} | {v['status']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for the .md and .json tables")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke run of this script)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (the first GPU contact)")
    args = ap.parse_args(argv)
    s = settings(args.tiny, args.quick)
    device = s["device"]
    with torch.device(device):   # initialise the weights on the device: seconds, not a minute
        model = random_model(bench_config(s["preset"]), device=device, dtype=s["dtype"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bandwidth = copy_bandwidth(device, s["bw_bytes"])
    result = {"device_name": name, "preset": s["preset"], "config": model.config.to_dict(),
              "dtype": str(s["dtype"]).replace("torch.", ""), "tiny": args.tiny,
              "top_k": s["top_k"], "top_p": s["top_p"], "copy_bandwidth_gbps": bandwidth / 1e9,
              "decode_backends": decode_backends(model, device, s["dtype"]),
              "step_timing": "CUDA-graph replay, CUDA events" if device.type == "cuda"
              else "eager, wall clock",
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result["decode"] = decode_rows(s, model, bandwidth)
    ar = ntp_vs_nbp(model, batch=1, repeats=s["repeats"], top_k=s["top_k"], top_p=s["top_p"],
                    device=device)
    result["autoregressive"] = {r["method"]: r for r in ar}
    print("autoregressive: " + ", ".join(f"{r['method']} {r['frames_per_s']:.1f} frames/s"
                                          for r in ar), flush=True)
    result["job"] = job_rows(s, model)
    result["machine"] = machine_info(device)
    result["verdicts"] = verdicts(result)
    text = markdown(result)
    write_table(args.out, "generate", name, result, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
