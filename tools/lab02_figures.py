"""Measure lab 02's full-mode table: RTN and GPTQ variants on the offline model (16 x 512 WikiText-2 windows).

    python tools/lab02_figures.py [--out results.jsonl] [--only NAME ...]

Each variant is one line of JSON (method, bits, calibration windows, perplexity, probe accuracy, seconds).
Takes ~45 min on a 2-core CPU; a few minutes on a GPU.
"""

import argparse
import json
import time

import compresslab as cl
from compresslab import scale_tuning

TUNE_STEPS = 60  # steps of 4 x 256 tokens of WikiText-2 valid (seed 1), lr 1e-3

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
    # then tune the fp16 scales and norm weights by KD from the FP model (compresslab.scale_tuning), codes fixed
    "gptq-ao-clip-tune-4": (4, "gptq", {"clip": True, "tune": TUNE_STEPS}),
    "gptq-ao-clip-tune-3": (3, "gptq", {"clip": True, "tune": TUNE_STEPS}),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lab02_figures.jsonl")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0, help="seed of the random calibration windows")
    args = parser.parse_args()
    env = cl.setup(quick=False)
    model, tok = cl.load_model(device=env.device)
    print(env, flush=True)
    calib = {n: cl.data.calibration_batches(tok, n_samples=n, seq_len=512, seed=args.seed) for n in (32, 128)}
    for name in args.only:
        bits, method, opts = VARIANTS[name]
        opts = dict(opts)
        windows, group_size, tune = opts.pop("windows", 32), opts.pop("group_size", 64), opts.pop("tune", 0)
        t0 = time.perf_counter()
        extra = {}
        if method == "rtn":
            qm = cl.quant.fake_quantize_model(model, bits, group_size, **opts)
        else:
            qm, report = cl.gptq.quantize_model(model, calib[windows], bits=bits, group_size=group_size,
                                                progress=False, **opts)
        if tune:
            extra["ppl_before_tuning"] = round(cl.evaluation.perplexity(qm, tok, 16, 512, progress=False), 3)
            train = cl.data.training_windows(tok, n_windows=256, seq_len=256, seed=1)
            hist = scale_tuning.tune_scales(qm, report, model, train, steps=tune, lr=1e-3, batch_size=4,
                                            progress=False)
            extra |= dict(tune_steps=tune, first_kl=round(hist["loss"][0], 4), last_kl=round(hist["loss"][-1], 4))
        seconds = time.perf_counter() - t0
        row = dict(name=name, bits=bits, group_size=group_size, windows=windows if method == "gptq" else None,
                   calib_seed=args.seed, seconds=round(seconds, 1), device=env.gpu_name or "cpu", **extra,
                   ppl=round(cl.evaluation.perplexity(qm, tok, 16, 512, progress=False), 3),
                   probe_acc=cl.evaluation.arithmetic_probe(qm, tok, 100, progress=False))
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        del qm


if __name__ == "__main__":
    main()
