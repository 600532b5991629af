"""GPTQ side by side: compresslab's cl.quantize against llm-compressor's oneshot, in one run, on one machine.

Same model folder, same calibration token ids, same torch thread count, run one after the other (never at once);
each side's seconds cover the quantization call only (cl.quantize / oneshot: calibration forwards + GPTQ), and each
side's perplexity is the lab's metric on the same WikiText-2 test windows. The metric is checked first: the
unquantized model must score the same perplexity in both venvs (to 1e-3), or the run stops.

llm-compressor pins a different transformers than the lab, so it runs in its own venv (git-ignored), through
tools/_llmc_gptq_driver.py (a subprocess per job). `make gptq-vs-llmc` creates that venv (.venv-llmc, by
tools/llmc_env.sh: torch first from the local CPU wheel, then llmcompressor==0.14.0.1 with torch held by a constraint)
and runs the full comparison; by hand, from the repo root, with the lab venv (it wants an otherwise idle machine):

    tools/llmc_env.sh
    .venv/bin/python tools/gptq_vs_llmcompressor.py --llmc-python .venv-llmc/bin/python \
        --samples 32 --seq-len 512 --ppl-windows 16 --threads 2 --out gptq_vs_llmc.json
    ... --variants "asym act-order static groups" "sym act-order static groups"     # some variants only

Variants (ours vs llm-compressor, W4 weights in groups of 64: SmolLM2's 576 columns are not divisible by 128):
    asym act-order static groups    act_order, static_groups, asym   vs  W4A16_ASYM, actorder="weight"
    asym act-order dynamic groups   act_order, dynamic groups, asym  vs  actorder="group" (gone in 0.14: noted)
    asym no act-order               no act_order, dynamic groups     vs  W4A16_ASYM, actorder=None
    asym no act-order static groups no act_order, static_groups      vs  W4A16_ASYM, actorder=None (the same run)
    sym act-order static groups     act_order, static_groups, sym    vs  W4A16, actorder="weight"
llm-compressor always takes its group scales from the original weights (its observer runs before GPTQ), so its
actorder=None matches our static_groups exactly; our default no-act-order GPTQ (dynamic groups, the paper's) is
listed too. Both use dampening 0.01 of the mean Hessian diagonal and 128-column lazy blocks. Everything runs on the
CPU (CUDA is hidden from llm-compressor): the comparison is about the same work on the same cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))  # compresslab, also when the lab venv does not install it
import compresslab as cl  # noqa: E402

DRIVER = Path(__file__).with_name("_llmc_gptq_driver.py")
BITS, GROUP_SIZE, DAMP, BLOCK = 4, 64, 0.01, 128  # the same on both sides
PPL_BATCH = 2  # compresslab.evaluation.perplexity's default batch size; the driver uses the same
METRIC_TOL = 1e-3  # |ppl ours - ppl llm-compressor| allowed on the unquantized model

SETUP = """Create the llm-compressor venv (its transformers pin differs from the lab's): tools/llmc_env.sh
(or make gptq-vs-llmc), then pass --llmc-python .venv-llmc/bin/python (or set LLMC_PYTHON)."""


@dataclass(frozen=True)
class Variant:
    name: str
    sym: bool
    act_order: bool
    static_groups: bool
    llmc_actorder: str | None  # llm-compressor's GPTQModifier(actorder=...): "weight", "group" or None

    def ours(self):
        return cl.GPTQConfig(bits=BITS, group_size=GROUP_SIZE, sym=self.sym, act_order=self.act_order,
                             static_groups=self.static_groups, damp=DAMP, lazy_block=BLOCK)

    def llmc_key(self) -> tuple:  # variants with the same key are one llm-compressor configuration: run it once
        return self.sym, self.llmc_actorder


VARIANTS = {v.name: v for v in [
    Variant("asym act-order static groups", sym=False, act_order=True, static_groups=True, llmc_actorder="weight"),
    Variant("asym act-order dynamic groups", sym=False, act_order=True, static_groups=False, llmc_actorder="group"),
    Variant("asym no act-order", sym=False, act_order=False, static_groups=False, llmc_actorder=None),
    Variant("asym no act-order static groups", sym=False, act_order=False, static_groups=True, llmc_actorder=None),
    Variant("sym act-order static groups", sym=True, act_order=True, static_groups=True, llmc_actorder="weight"),
]}


# ----------------------------------------------------------------------------- the machine and the versions


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "loadavg_start": os.getloadavg()}


def lab_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers"):
        out[name] = metadata.version(name)
    out["compresslab"] = cl.__version__
    return out


# ----------------------------------------------------------------------------- the llm-compressor subprocess


class Llmc:
    """Runs driver jobs with the llm-compressor venv's python, one at a time, in the temp dir."""

    def __init__(self, python: str, tmp: Path, threads: int):
        self.python, self.tmp, self.threads, self.n = python, tmp, threads, 0
        # a clean environment: none of the lab venv's paths, CUDA hidden, no hub, the same thread count
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        self.env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="",
                        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                        TOKENIZERS_PARALLELISM="false")

    def run(self, job: dict, what: str) -> dict:
        self.n += 1
        job_path, result_path = self.tmp / f"job{self.n}.json", self.tmp / f"result{self.n}.json"
        log_path = self.tmp / f"llmc{self.n}.log"
        job_path.write_text(json.dumps({**job, "threads": self.threads}))
        with open(log_path, "w") as log:
            rc = subprocess.call([self.python, str(DRIVER), str(job_path), str(result_path)], cwd=self.tmp,
                                 env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if rc != 0 or not result_path.exists():
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
            hint = f"\n\n{SETUP}" if job["task"] == "probe" else ""
            sys.exit(f"llm-compressor {what} failed (exit {rc}); last lines of {log_path}:\n{tail}{hint}")
        return json.loads(result_path.read_text())


def check_llmc_python(path: str | None) -> str:
    if not path:
        sys.exit(f"--llmc-python is missing: the python of a venv with llm-compressor.\n{SETUP}")
    if not (Path(path).is_file() and os.access(path, os.X_OK)):
        sys.exit(f"--llmc-python {path}: no such executable.\n{SETUP}")
    return os.path.abspath(path)  # the jobs run in a temp dir; abspath keeps the venv's own symlinked python


# ----------------------------------------------------------------------------- our side (in this process)


def run_ours(variant: Variant, calib: torch.Tensor, n_windows: int, ppl_seq_len: int) -> dict:
    model, tok = cl.load_model(dtype="float32", device="cpu")  # a fresh fp32 model per variant
    config = variant.ours()
    t0 = time.perf_counter()
    cl.quantize(model, config, calibration=calib, progress=False)
    seconds = time.perf_counter() - t0
    ppl = cl.evaluation.perplexity(model, tok, n_windows, ppl_seq_len, batch_size=PPL_BATCH, progress=False)
    del model
    gc.collect()
    return {"seconds": seconds, "ppl": ppl}


# ----------------------------------------------------------------------------- the run


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="variants: " + "; ".join(f'"{n}"' for n in VARIANTS))
    p.add_argument("--llmc-python", default=os.environ.get("LLMC_PYTHON"),
                   help="python of the llm-compressor venv (default: $LLMC_PYTHON)")
    p.add_argument("--samples", type=int, default=32, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--ppl-windows", type=int, default=16, help="WikiText-2 test windows for perplexity")
    p.add_argument("--ppl-seq-len", type=int, default=512, help="tokens per perplexity window")
    p.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    p.add_argument("--llmc-batch-size", type=int, default=1, help="oneshot's calibration batch size (its default)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME", help="default: all")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (tensors, jobs, llm-compressor logs)")
    p.add_argument("--warmup", type=int, default=8, help="windows of an untimed GPTQ run first, on each side (each "
                   "llm-compressor job is a fresh process, so it warms up every time; 0: none)")
    args = p.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from: " + "; ".join(f'"{n}"' for n in VARIANTS))
    variants = [VARIANTS[v] for v in dict.fromkeys(args.variants)]
    llmc_python = check_llmc_python(args.llmc_python)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar per model load
    tmp = Path(tempfile.mkdtemp(prefix="gptq_vs_llmc-"))
    llmc = Llmc(llmc_python, tmp, args.threads)

    # ---- versions and machine
    info = {"machine": machine(), "ours": {**lab_versions(), "threads": torch.get_num_threads()}}
    probe = llmc.run({"task": "probe"}, "import check")
    info["llmc"] = {**probe["versions"], "threads": probe["threads"], "python_path": llmc_python}
    m = info["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), load avg "
          + " ".join(f"{x:.2f}" for x in m["loadavg_start"]))
    for side in ("ours", "llmc"):
        v = info[side]
        extra = f"compresslab {v['compresslab']}" if side == "ours" else \
            f"llmcompressor {v['llmcompressor']}, compressed-tensors {v['compressed-tensors']}"
        print(f"{side:>5}: torch {v['torch']}, transformers {v['transformers']}, {extra}, {v['threads']} threads")

    # ---- one set of data, saved for both sides
    model_dir = str(cl.models.default_model_dir())
    model, tok = cl.load_model(dtype="float32", device="cpu")
    hidden = model.config.hidden_size
    if args.samples * args.seq_len < hidden:  # cl.quantize refuses this too, but only after the baseline
        sys.exit(f"--samples {args.samples} x --seq-len {args.seq_len} = {args.samples * args.seq_len} calibration "
                 f"tokens cannot estimate a {hidden}x{hidden} Hessian: use at least {hidden} "
                 f"(e.g. --samples 8 --seq-len 128)")
    calib = cl.data.calibration_batches(tok, args.samples, args.seq_len, seed=0)  # (samples, seq_len)
    windows = cl.data.test_windows(tok, args.ppl_windows, args.ppl_seq_len)  # what perplexity() evaluates on
    torch.save(calib.clone(), tmp / "calib.pt")
    torch.save(windows.clone(), tmp / "windows.pt")
    data = {"model_dir": model_dir, "calib": str(tmp / "calib.pt"), "windows": str(tmp / "windows.pt"),
            "ppl_batch_size": PPL_BATCH}
    print(f"data: {args.samples} x {args.seq_len} calibration tokens (WikiText-2 valid, seed 0); perplexity on "
          f"{args.ppl_windows} x {args.ppl_seq_len} WikiText-2 test tokens; model {model_dir}")

    # ---- the metric must be the same on both sides: unquantized model, both venvs
    base_ours = cl.evaluation.perplexity(model, tok, args.ppl_windows, args.ppl_seq_len, batch_size=PPL_BATCH,
                                        progress=False)
    del model
    gc.collect()
    base_llmc = llmc.run({"task": "baseline", **data}, "baseline perplexity")["ppl"]
    diff = abs(base_ours - base_llmc)
    ok = diff <= METRIC_TOL
    print(f"metric check (fp32 model): ours {base_ours:.4f}, llm-compressor venv {base_llmc:.4f}, "
          f"|diff| {diff:.2e} {'<=' if ok else '>'} {METRIC_TOL:g}: {'PASS' if ok else 'FAIL'}")
    info["baseline"] = {"ours": base_ours, "llmc": base_llmc, "abs_diff": diff, "tol": METRIC_TOL, "pass": ok}
    if not ok:
        sys.exit("The two venvs disagree on the unquantized model's perplexity, so their quantized perplexities "
                 "are not comparable. Check that both load the same model folder in float32 and that "
                 f"{DRIVER.name}'s perplexity() still matches compresslab's evaluation.perplexity.")

    # ---- warm-up: a process's first GPTQ pays 7-15 s more (measured, 2026-12-06); untimed on both sides
    if args.warmup:
        model, _ = cl.load_model(dtype="float32", device="cpu")
        cl.quantize(model, variants[0].ours(), calibration=calib[: args.warmup], progress=False)
        del model
        gc.collect()
        print(f"warm-up: one untimed GPTQ on {args.warmup} windows on each side (llm-compressor: in every job)")

    # ---- the variants: ours, then llm-compressor's, one after the other
    rows, llmc_done = [], {}
    for v in variants:
        print(f"\n== {v.name}", flush=True)
        r = run_ours(v, calib, args.ppl_windows, args.ppl_seq_len)
        rows.append({"tool": "compresslab", "variant": v.name, **r,
                     "config": {"sym": v.sym, "act_order": v.act_order, "static_groups": v.static_groups}})
        print(f"   compresslab     {r['seconds']:8.1f} s   ppl {r['ppl']:.4f}", flush=True)
        llmc_cfg = {"sym": v.sym, "actorder": v.llmc_actorder, "scheme": "W4A16" if v.sym else "W4A16_ASYM"}
        if v.llmc_key() in llmc_done:  # the same llm-compressor configuration as an earlier variant
            r = {**llmc_done[v.llmc_key()][0], "note": f"same llm-compressor run as '{llmc_done[v.llmc_key()][1]}'"}
        else:
            job = {"task": "gptq", **data, "bits": BITS, "group_size": GROUP_SIZE, "sym": v.sym,
                   "actorder": v.llmc_actorder, "damp": DAMP, "block_size": BLOCK, "batch_size": args.llmc_batch_size,
                   "warmup": args.warmup}
            r = llmc.run(job, f"GPTQ ({v.name})")
            r.pop("threads", None)
            llmc_done[v.llmc_key()] = (r, v.name)
        rows.append({"tool": "llm-compressor", "variant": v.name, "seconds": r.get("seconds"), "ppl": r.get("ppl"),
                     "config": llmc_cfg, **{k: r[k] for k in ("unsupported", "note") if k in r}})
        print(f"   llm-compressor  {fmt(r.get('seconds'), '8.1f')} s   ppl {fmt(r.get('ppl'), '.4f')}"
              + (f"   ({r.get('unsupported') or r.get('note')})" if "unsupported" in r or "note" in r else ""),
              flush=True)

    # ---- the table
    info["machine"]["loadavg_end"] = os.getloadavg()
    print(f"\nGPTQ W{BITS} g{GROUP_SIZE}, {args.samples} x {args.seq_len} calibration tokens, {args.threads} threads; "
          f"fp32 perplexity {base_ours:.4f} ({args.ppl_windows} x {args.ppl_seq_len} tokens); load avg at end "
          + " ".join(f"{x:.2f}" for x in info["machine"]["loadavg_end"]))
    print(f"{'tool':<15} {'variant':<32} {'seconds':>9} {'perplexity':>11}")
    for r in rows:
        print(f"{r['tool']:<15} {r['variant']:<32} {fmt(r['seconds'], '9.1f')} {fmt(r['ppl'], '11.4f')}")
    print("\nper variant (llm-compressor seconds / ours; perplexity ours - llm-compressor):")
    for v in variants:
        ours, theirs = [r for r in rows if r["variant"] == v.name]
        if theirs["seconds"] is None:
            print(f"  {v.name:<32} llm-compressor: {theirs.get('unsupported', 'no result')}")
        else:
            print(f"  {v.name:<32} {theirs['seconds'] / ours['seconds']:5.2f}x   "
                  f"{ours['ppl'] - theirs['ppl']:+.4f} ppl")

    if args.out:
        settings = {k: getattr(args, k) for k in ("samples", "seq_len", "ppl_windows", "ppl_seq_len", "threads",
                                                  "llmc_batch_size", "warmup")}
        args.out.write_text(json.dumps({**info, "settings": {**settings, "bits": BITS, "group_size": GROUP_SIZE,
                                                             "damp": DAMP, "block_size": BLOCK},
                                        "results": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")
    if args.keep_tmp:
        print(f"temp dir kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
