"""Measure lab 04's full-mode table: magnitude, Wanda, SparseGPT and structured pruning on the offline model
(perplexity on 16 x 512 WikiText-2 test windows; calibration 32 x 512 windows of WikiText-2 valid, seed 0).

    python tools/lab04_figures.py [--out lab04_figures.jsonl] [--only NAME ...]

Each variant is one line of JSON (name, method, sparsity, perplexity, probe accuracy, seconds; for structured
pruning also parameters and the median 1 x 512 prefill latency). Takes about an hour on a 2-core CPU.
"""

import argparse
import json
import time

import compresslab as cl
from compresslab import pruning

SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
# name -> (method, options for pruning.prune_model / prune_mlp_neurons)
VARIANTS = {"dense": ("dense", {})}
VARIANTS |= {f"{meth}-{int(s * 100)}": (meth, {"sparsity": s}) for meth in ("magnitude", "wanda") for s in SPARSITIES}
VARIANTS |= {f"{meth}-{n}:{m}": (meth, {"pattern": f"{n}:{m}"}) for meth in ("magnitude", "wanda") for n, m in ((2, 4), (4, 8))}
VARIANTS |= {
    "wanda-50-onepass": ("wanda", {"sparsity": 0.5, "sequential": False}),
    "sparsegpt-50": ("sparsegpt", {"sparsity": 0.5}), "sparsegpt-2:4": ("sparsegpt", {"pattern": "2:4"}),
    "sparsegpt-2:4-4bit": ("sparsegpt", {"pattern": "2:4", "bits": 4, "group_size": 64}),
    "wanda-50-128w": ("wanda", {"sparsity": 0.5, "windows": 128}),
    "sparsegpt-50-128w": ("sparsegpt", {"sparsity": 0.5, "windows": 128}),
    "sparsegpt-2:4-128w": ("sparsegpt", {"pattern": "2:4", "windows": 128}),
}
VARIANTS |= {  # prune, then recover: masked fine-tune on WikiText-2 valid (256-token windows, seed 1), mask fixed
    "wanda-50-recover": ("wanda", {"sparsity": 0.5, "recover": 100}),
    "wanda-2:4-recover": ("wanda", {"pattern": "2:4", "recover": 100}),
    "sparsegpt-50-recover": ("sparsegpt", {"sparsity": 0.5, "recover": 100}),
    "sparsegpt-2:4-recover": ("sparsegpt", {"pattern": "2:4", "recover": 100}),
}
VARIANTS |= {f"structured-{int(r * 100)}": ("structured", {"ratio": r}) for r in (0.1, 0.25, 0.4, 0.5)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lab04_figures.jsonl")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS))
    parser.add_argument("--no-probe", action="store_true")
    args = parser.parse_args()
    env = cl.setup(quick=False)
    model, tok = cl.load_model(device=env.device)
    print(env, flush=True)
    calib = {}
    for name in args.only:
        method, opts = VARIANTS[name]
        opts = dict(opts)
        windows, recover = opts.pop("windows", 32), opts.pop("recover", 0)
        if windows not in calib:
            calib[windows] = cl.data.calibration_batches(tok, n_samples=windows, seq_len=512, seed=0)
        t0 = time.perf_counter()
        extra = {}
        if method == "dense":
            pm = model
        elif method == "structured":
            pm, _ = pruning.prune_mlp_neurons(model, calib[windows], progress=False, **opts)
        else:
            pm, report = pruning.prune_model(model, calib[windows], method, progress=False, **opts)
            extra["sparsity_reached"] = round(sum(report.values()) / len(report), 4)
            if recover:
                extra["ppl_before_recovery"] = round(cl.evaluation.perplexity(pm, tok, 16, 512, progress=False), 3)
                train = cl.data.training_windows(tok, n_windows=256, seq_len=256, seed=1)  # <unk>-free, as GPTQ/KD
                losses = pruning.finetune_masked(pm, train, steps=recover, lr=1e-4, batch_size=4, progress=False)
                extra |= dict(recover_steps=recover, first_loss=round(losses[0], 3), last_loss=round(losses[-1], 3),
                              sparsity_after=round(sum(pruning.sparsity_of(pm.get_submodule(k).weight) for k in report)
                                                   / len(report), 4))
        seconds = time.perf_counter() - t0
        if method in ("dense", "structured"):
            extra |= dict(params=pruning.count_parameters(pm),
                          prefill_ms=round(1000 * cl.evaluation.prefill_seconds(pm, tok, 512, 1, 7), 1))
        row = dict(name=name, method=method, **opts, windows=windows, seconds=round(seconds, 1),
                   device=env.gpu_name or "cpu", ppl=round(cl.evaluation.perplexity(pm, tok, 16, 512, progress=False), 3),
                   probe_acc=None if args.no_probe else cl.evaluation.arithmetic_probe(pm, tok, 100, progress=False),
                   **extra)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        del pm


if __name__ == "__main__":
    main()
