"""Measure lab 02's full-mode table: RTN and GPTQ variants on the offline model (16 x 512 WikiText-2 windows).

    python tools/lab02_figures.py [--out results.jsonl] [--only NAME ...]

Each variant is one line of JSON (method, bits, calibration windows, perplexity, probe accuracy, seconds).
Takes ~45 min on a 2-core CPU; a few minutes on a GPU.
"""

import argparse
import json
import time

import compresslab as cl

# name -> (bits, method, options); GPTQ options go to cl.gptq.quantize_model, 'windows' = calibration windows
VARIANTS = {
    "rtn-4": (4, "rtn", {}), "rtn-3": (3, "rtn", {}),
    "rtn-clip-4": (4, "rtn", {"clip": True}), "rtn-clip-3": (3, "rtn", {"clip": True}),
    "gptq-4": (4, "gptq", {"act_order": False}), "gptq-3": (3, "gptq", {"act_order": False}),
    "gptq-ao-4": (4, "gptq", {}), "gptq-ao-3": (3, "gptq", {}),
    "gptq-ao-static-4": (4, "gptq", {"static_groups": True}),
    "gptq-ao-sym-4": (4, "gptq", {"sym": True}),
    "gptq-ao-clip-4": (4, "gptq", {"clip": True}), "gptq-ao-clip-3": (3, "gptq", {"clip": True}),
    "gptq-ao-128-4": (4, "gptq", {"windows": 128}), "gptq-ao-128-3": (3, "gptq", {"windows": 128}),
    "gptq-ao-clip-128-4": (4, "gptq", {"clip": True, "windows": 128}),
    "gptq-ao-clip-128-3": (3, "gptq", {"clip": True, "windows": 128}),
    "gptq-ao-g32-4": (4, "gptq", {"group_size": 32}),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lab02_figures.jsonl")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    env = cl.setup(quick=False)
    model, tok = cl.load_model(device=env.device)
    print(env, flush=True)
    calib = {n: cl.data.calibration_batches(tok, n_samples=n, seq_len=512, seed=0) for n in (32, 128)}
    for name in args.only:
        bits, method, opts = VARIANTS[name]
        opts = dict(opts)
        windows, group_size = opts.pop("windows", 32), opts.pop("group_size", 64)
        t0 = time.perf_counter()
        if method == "rtn":
            qm = cl.quant.fake_quantize_model(model, bits, group_size, **opts)
        else:
            qm, _ = cl.gptq.quantize_model(model, calib[windows], bits=bits, group_size=group_size, progress=False,
                                           **opts)
        seconds = time.perf_counter() - t0
        row = dict(name=name, bits=bits, group_size=group_size, windows=windows if method == "gptq" else None,
                   seconds=round(seconds, 1), device=env.gpu_name or "cpu",
                   ppl=round(cl.eval.perplexity(qm, tok, 16, 512, progress=False), 3),
                   probe_acc=cl.eval.arithmetic_probe(qm, tok, 100, progress=False))
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        del qm


if __name__ == "__main__":
    main()
