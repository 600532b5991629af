"""Measure lab 05's full-mode students: CE vs KD at equal steps and data, as section 7 of the lab trains them.

    python tools/lab05_figures.py [--out lab05_figures.jsonl] [--runs ce forward:1:0.5 reverse:1:0.5 ...]

A run is `ce` (plain fine-tuning) or `kind:T:alpha` (lab 05's kd_loss). Every run starts from the same student (the
teacher with its 10 lowest-Block-Influence layers dropped) and sees the same 48 x 4 windows of 256 tokens in the
same order; perplexity on 16 x 512 WikiText-2 test windows after 0, 16, 32 and 48 steps. One JSON line per run.
CE takes ~4.5 min and a KD run ~6.5 min on a 2-core CPU.
"""

import argparse
import copy
import json
import math
import time

import compresslab as cl
from compresslab import distill


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="lab05_figures.jsonl")
    parser.add_argument("--runs", nargs="*", default=["ce", "forward:1:0.5", "reverse:1:0.5", "forward:2:0.5"])
    parser.add_argument("--steps", type=int, default=48)
    args = parser.parse_args()
    env = cl.setup(quick=False, seed=0, lab="05")
    sz = env.sizes
    teacher, tok = cl.load_model(device=env.device)
    calib = cl.data.calibration_batches(tok, n_samples=sz.calib_samples, seq_len=sz.calib_len, seed=0)
    batch, seq_len = 4, 256  # as the lab's full mode
    train_ids = cl.data.training_windows(tok, n_windows=args.steps * batch, seq_len=seq_len, seed=0)
    student0, _ = distill.make_student(teacher, calib, n_layers=20)

    def ppl_of(m):
        return cl.evaluation.perplexity(m, tok, sz.ppl_windows, sz.seq_len, progress=False)

    ppl_teacher, ppl_pruned = ppl_of(teacher), ppl_of(student0)
    for run in args.runs:
        if run == "ce":
            kw = dict(alpha=1.0)
        else:
            kind, T, alpha = run.split(":")
            kw = dict(kind=kind, T=float(T), alpha=float(alpha))
        student = copy.deepcopy(student0)
        t0 = time.perf_counter()
        hist = distill.distill(student, train_ids, teacher=None if kw["alpha"] == 1 else teacher, steps=args.steps,
                               lr=2e-4, batch_size=batch, warmup=max(1, args.steps // 10), eval_fn=ppl_of,
                               eval_every=max(1, args.steps // 3), seed=0, progress=False, **kw)
        ppl = hist["eval"][-1]
        row = dict(run=run, **kw, steps=args.steps, tokens_per_step=batch * seq_len, device=env.gpu_name or "cpu",
                   seconds=round(time.perf_counter() - t0, 1), ppl_teacher=round(ppl_teacher, 3),
                   ppl_pruned=round(ppl_pruned, 3), eval_steps=hist["eval_step"],
                   ppl_along=[round(e, 3) for e in hist["eval"]], ppl=round(ppl, 3),
                   gap_recovered=round((math.log(ppl_pruned) - math.log(ppl))
                                       / (math.log(ppl_pruned) - math.log(ppl_teacher)), 4))
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
