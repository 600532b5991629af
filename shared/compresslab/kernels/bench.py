"""`make bench`: how fast the kernels are on this GPU, against the memory roofline and the libraries.

    python -m compresslab.kernels.bench                 # GPU: LLM shapes, batch 1..64 -> bench/<gpu>.json + .png
    python -m compresslab.kernels.bench --smoke         # CPU interpreter, tiny shapes: checks the script runs

What is measured (CUDA events, median of repeated calls):
  * copy bandwidth: a 1 GiB device-to-device copy, (read + write) / time — the practical ceiling of any kernel;
  * W4A16 (contiguous groups, and act-order g_idx) vs torch fp16 F.linear (cuBLAS), bitsandbytes NF4 and torchao
    int4 where they import; for each, time per call and effective bandwidth = minimum bytes moved / time;
  * KV quantization kernel vs the PyTorch reference;
  * end to end: greedy decode tokens/s of SmolLM2-135M in fp16 vs with every decoder Linear a QuantLinear.
Weights rotate through enough copies to exceed the L2 cache (H100: 50 MB), so every call reads HBM as in a real
decode step — a benchmark that reuses one 8 MB weight measures L2, not memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import interpreting, kv_quant, w4a16

LLM_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K, N): Llama-3-8B's attention and MLP
LAB_SHAPES = [(576, 576), (576, 1536), (1536, 576), (896, 4864), (4864, 896)]  # SmolLM2-135M, Qwen2.5-0.5B MLP
BATCHES = [1, 2, 4, 8, 16, 32, 64]
SMOKE_SHAPES, SMOKE_BATCHES = [(128, 64)], [1, 9]
ROTATE_BYTES = 256 * 2**20  # cycle through this much weight data so no call is served from L2


def _timer(fn, reps: int, warmup: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available() and not interpreting():
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, nbytes: int = 2**30) -> float:
    """Bytes per second of a device-to-device copy (counting the read and the write)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    t = _timer(lambda: dst.copy_(src), reps=20, warmup=3)
    return 2 * nbytes / t


class _Rotating:
    """n copies of the same call's operands, used round-robin so the working set exceeds the L2 cache."""

    def __init__(self, make, nbytes_each: int, smoke: bool):
        self.items = [make() for _ in range(1 if smoke else max(1, -(-ROTATE_BYTES // max(nbytes_each, 1))))]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def _optional_baselines(weight: torch.Tensor, smoke: bool) -> dict:
    """Callables x -> y for bitsandbytes NF4 and torchao int4, or the reason each is unavailable."""
    out = {}
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf

        if smoke:
            raise RuntimeError("skipped in --smoke")
        packed, state = bf.quantize_4bit(weight, quant_type="nf4", blocksize=64)
        out["bnb_nf4"] = lambda x: bnb.matmul_4bit(x, packed.t(), quant_state=state)
    except Exception as err:  # noqa: BLE001 — any failure is reported in the JSON, not fatal
        out["bnb_nf4"] = f"unavailable: {type(err).__name__}: {err}"[:200]
    try:
        if smoke:
            raise RuntimeError("skipped in --smoke")
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=torch.bfloat16)
        lin.weight.data.copy_(weight)
        quantize_(lin, Int4WeightOnlyConfig(group_size=128))
        out["torchao_int4"] = lambda x: lin(x.to(torch.bfloat16))
    except Exception as err:  # noqa: BLE001
        out["torchao_int4"] = f"unavailable: {type(err).__name__}: {err}"[:200]
    return out


def bench_w4a16(shapes, batches, group_size: int, device, smoke: bool, reps: int) -> list[dict]:
    rows = []
    for k, n in shapes:
        gen = torch.Generator(device="cpu").manual_seed(0)
        w = (torch.randn(n, k, generator=gen) * 0.02).to(device)
        qw, qz, s, g = w4a16.rtn_gptq(w, group_size)
        perm = torch.randperm(k, generator=gen).to(device)
        g_act = g[perm].contiguous()  # act-order: the groups of a permuted column order (non-monotone g_idx)
        w16 = w.half()
        quant = _Rotating(lambda: (qw.clone(), qz.clone(), s.clone()), qw.numel() * 4 + s.numel() * 2, smoke)
        dense = _Rotating(lambda: w16.clone(), w16.numel() * 2, smoke)
        baselines = _optional_baselines(w16, smoke)
        for m in batches:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            moved = w4a16.bytes_moved(m, n, k, group_size)
            calls = {
                "fp16": (lambda: F.linear(x, dense.next()), 2 * n * k + 2 * m * (k + n)),
                "w4a16": (lambda: w4a16.w4a16_matmul(x, *quant.next(), None, group_size), moved),
                "w4a16_act_order": (lambda: w4a16.w4a16_matmul(x, *quant.next(), g_act, group_size),
                                    w4a16.bytes_moved(m, n, k, group_size, g_idx=True)),
            }
            for name, fn in baselines.items():
                if callable(fn):
                    calls[name] = ((lambda fn=fn: fn(x)), moved)
            row = {"K": k, "N": n, "M": m, "group_size": group_size}
            for name, (fn, nbytes) in calls.items():
                t = _timer(fn, reps=reps, warmup=1 if smoke else 10)
                row[name] = {"us": t * 1e6, "GBps": nbytes / t / 1e9}
            for name, fn in baselines.items():
                if not callable(fn):
                    row[name] = fn
            row["speedup_vs_fp16"] = row["fp16"]["us"] / row["w4a16"]["us"]
            rows.append(row)
            print(f"K={k:6d} N={n:6d} M={m:3d}  fp16 {row['fp16']['us']:9.1f} us  w4a16 {row['w4a16']['us']:9.1f} us"
                  f" ({row['w4a16']['GBps']:7.1f} GB/s, {row['speedup_vs_fp16']:.2f}x)  act-order "
                  f"{row['w4a16_act_order']['us']:9.1f} us", flush=True)
    return rows


def bench_kv(device, smoke: bool, reps: int) -> list[dict]:
    from .. import kvcompress

    shape = (1, 2, 64, 64) if smoke else (8, 8, 4096, 128)
    rows = []
    for kind in ("key", "value"):
        for bits in (2, 4):
            x = torch.randn(*shape, device=device, dtype=torch.float16)
            dim = -2 if kind == "key" else -1
            t_ref = _timer(lambda: kvcompress.quantize_groups(x, bits, 64, dim), reps, 1 if smoke else 5)
            t_ker = _timer(lambda: kv_quant.quantize_kv(x, kind, bits, 64), reps, 1 if smoke else 5)
            q = kv_quant.quantize_kv(x, kind, bits, 64)
            t_deq = _timer(lambda: kv_quant.dequantize_kv(q, torch.float16), reps, 1 if smoke else 5)
            nbytes = x.numel() * 2 + sum(q.nbytes().values())
            rows.append({"kind": kind, "bits": bits, "shape": list(shape), "torch_us": t_ref * 1e6,
                         "triton_us": t_ker * 1e6, "dequant_us": t_deq * 1e6, "triton_GBps": nbytes / t_ker / 1e9,
                         "speedup": t_ref / t_ker})
            print(f"KV {kind:5s} {bits}-bit {shape}: torch {t_ref * 1e6:8.1f} us  triton {t_ker * 1e6:8.1f} us "
                  f"({t_ref / t_ker:.1f}x)", flush=True)
    return rows


def bench_decode(device, smoke: bool, new_tokens: int = 128) -> dict:
    """Greedy decode tokens/s of SmolLM2-135M, fp16 vs W4A16 QuantLinear (group 64: its 576 is not a multiple of 128)."""
    import copy

    from ..models import load_model

    if smoke:
        return {"skipped": "--smoke (the interpreter runs a 135M model too slowly to time)"}
    model, tok = load_model("smollm2-135m", dtype="float16", device=str(device))
    ids = tok("The history of the transistor", return_tensors="pt").to(device)
    out = {}

    def run(m):
        m.generate(**ids, max_new_tokens=8, do_sample=False)  # warm up, autotune
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gen = m.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        return new_tokens / (time.perf_counter() - t0), gen

    out["fp16_tok_s"], ref = run(model)
    qmodel = w4a16.quantize_model(copy.deepcopy(model), group_size=64)
    out["w4a16_tok_s"], got = run(qmodel)
    n = min(ref.shape[1], got.shape[1])
    out["greedy_token_agreement"] = float((ref[0, :n] == got[0, :n]).float().mean())
    out["note"] = ("batch 1, 128 new tokens; a 135M model's decode is dominated by launch overhead, not weight "
                   "bytes, so this end-to-end ratio understates the kernel speedup")
    print(f"decode: fp16 {out['fp16_tok_s']:.1f} tok/s, W4A16 {out['w4a16_tok_s']:.1f} tok/s", flush=True)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    peak = results["copy_GBps"]
    for k, n in sorted({(r["K"], r["N"]) for r in results["w4a16"]}):
        rows = [r for r in results["w4a16"] if (r["K"], r["N"]) == (k, n)]
        ms = [r["M"] for r in rows]
        (line,) = ax1.plot(ms, [r["w4a16"]["GBps"] for r in rows], "o-", label=f"W4A16 {k}x{n}")
        ax1.plot(ms, [r["fp16"]["GBps"] for r in rows], "x--", color=line.get_color(), alpha=0.6)
        ax2.plot(ms, [r["speedup_vs_fp16"] for r in rows], "o-", color=line.get_color(), label=f"{k}x{n}")
    ax1.axhline(peak, color="k", lw=2, label=f"copy bandwidth {peak:.0f} GB/s")
    ax1.axhline(0.8 * peak, color="k", lw=1, ls=":", label="80 % of copy")
    ax1.set(xscale="log", xlabel="batch rows M", ylabel="effective GB/s (x: fp16 cuBLAS)",
            title=f"W4A16 vs the memory roofline — {results['device']}")
    ax2.axhline(1, color="k", lw=1)
    ax2.set(xscale="log", xlabel="batch rows M", ylabel="speedup over fp16 F.linear", title="where 4-bit pays")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU through the Triton interpreter")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--out", default="bench", help="folder for <device>.json and <device>.png")
    p.add_argument("--shapes", choices=["all", "llm", "lab"], default="all")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not interpreting()
    if not gpu and not args.smoke:
        raise SystemExit("make bench needs a CUDA GPU (sm80+ for the figures in issue 8). On CPU, run "
                         "`python -m compresslab.kernels.bench --smoke` to check the script, or `make test` for "
                         "the kernels' correctness under the Triton interpreter.")
    device = torch.device("cuda" if gpu else "cpu")
    name = torch.cuda.get_device_name() if gpu else "cpu-interpreter"
    shapes = SMOKE_SHAPES if args.smoke else {"all": LLM_SHAPES + LAB_SHAPES, "llm": LLM_SHAPES,
                                              "lab": LAB_SHAPES}[args.shapes]
    batches = SMOKE_BATCHES if args.smoke else BATCHES
    reps = 3 if args.smoke else 50
    import triton

    results = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
               "python": platform.python_version(), "group_size": args.group_size,
               "timings_meaningful": gpu,
               "copy_GBps": copy_bandwidth(device, 2**20 if args.smoke else 2**30) / 1e9}
    print(f"{name}: copy bandwidth {results['copy_GBps']:.0f} GB/s", flush=True)
    gs = 32 if args.smoke else args.group_size
    results["w4a16"] = bench_w4a16(shapes, batches, gs, device, args.smoke, reps)
    results["targets"] = [  # issue 8's figures: batch 1 on the LLM shapes, >= 80 % of copy bandwidth, >= 3.3x fp16
        {"K": r["K"], "N": r["N"], "fraction_of_copy": r["w4a16"]["GBps"] / results["copy_GBps"],
         "speedup_vs_fp16": r["speedup_vs_fp16"],
         "vs_torchao": (r["torchao_int4"]["us"] / r["w4a16"]["us"]) if isinstance(r.get("torchao_int4"), dict) else None}
        for r in results["w4a16"] if r["M"] == 1 and (r["K"], r["N"]) in LLM_SHAPES + SMOKE_SHAPES]
    results["kv_quant"] = bench_kv(device, args.smoke, reps)
    results["decode"] = bench_decode(device, args.smoke)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = name.replace(" ", "_").replace("/", "_")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    plot(results, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .png")
    return results


if __name__ == "__main__":
    main()
