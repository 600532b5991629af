"""Stacking the day's methods on one model (lab 08's capstone), and the bytes each recipe really costs.

A recipe is an ordered list of steps, each a (kind, argument) pair, e.g.

    [("student", 20), ("distill", 12), ("gptq", 4), ("kv", KVConfig(method="gear", bits=2))]

    student  n_layers  drop the teacher's lowest-Block-Influence layers (lab 05)
    distill  steps     KD from the teacher at T = 1 (lab 05's winner); directly after "student"
    prune    "2:4"     SparseGPT N:M pruning (lab 04); followed by "gptq" it becomes SparseGPT's joint
                       prune-and-quantize pass, so the quantizer never refills the pruned zeros
    gptq     bits      GPTQ, act-order, group 64 (lab 02)
    lowrank  rank      rank-r error compensation of the quantized weights (lab 08); right after "gptq"
    kv       KVConfig  compressed KV cache at run time (lab 06); last. Without it a recipe runs (and is counted)
                       with the fp16 cache a deployment stores, KVConfig("fp16"), never the model's fp32 states

The order is part of the recipe: `plan` rejects what the code cannot do (or would do wrongly) and says why.
Once every recipe is measured, `choose_recipe` picks the best one that fits a memory budget (`deployment_bytes`:
weights + KV cache at a context and batch) and `recipe_card` one per kind of constraint.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from . import deploy, distill, gptq, kvcompress, lowrank, pruning

KINDS = ("student", "distill", "prune", "gptq", "lowrank", "kv")
RANK = {k: i for i, k in enumerate(KINDS)}  # the only order in which the steps compose
GROUP_SIZE = 64


@dataclass
class Built:
    """A stacked model and what it stores."""

    name: str
    model: torch.nn.Module
    steps: list
    bits: int = 16
    nm: tuple[int, int] | None = None
    extra_params: int = 0  # fp16 low-rank factors
    kv: kvcompress.KVConfig = field(default_factory=lambda: kvcompress.KVConfig("fp16"))  # what the cache stores
    info: dict = field(default_factory=dict)

    def weight_bytes(self) -> float:
        return recipe_weight_bytes(self.model, self.bits, self.nm, self.extra_params)


def plan(steps) -> list[tuple[str, object]]:
    """Validate a recipe's steps and return them as (kind, arg) pairs, or raise naming the fix."""
    steps = [tuple(s) if isinstance(s, (tuple, list)) else (s, None) for s in steps]
    for s in steps:
        if len(s) != 2:
            raise ValueError(f"each step is a (kind, argument) pair, got {s!r}")
    kinds = [k for k, _ in steps]
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown step {k!r}; steps are {KINDS}")
    for k in set(kinds):
        if kinds.count(k) > 1:
            raise ValueError(f"step {k!r} appears {kinds.count(k)} times; each step once per recipe")
    for i, (prev, k) in enumerate(zip(kinds, kinds[1:])):
        if RANK[k] > RANK[prev]:
            continue
        if prev == "gptq" and k == "prune":
            why = ("prune before quantizing: zeroing quantized weights throws away GPTQ's error compensation; "
                   "[('prune', '2:4'), ('gptq', 4)] runs SparseGPT's joint prune-and-quantize pass")
        elif k in ("student", "distill"):
            why = (f"{k!r} must come first: the student is derived from and trained against the dense teacher, and "
                   "training would move pruned or quantized weights off their mask or grid")
        elif prev == "kv":
            why = "'kv' configures the cache at run time: put it last"
        else:
            why = f"supported order: {' -> '.join(KINDS)}"
        raise ValueError(f"step {k!r} cannot follow {prev!r}: {why}")
    if "distill" in kinds and (kinds.index("distill") == 0 or kinds[kinds.index("distill") - 1] != "student"):
        raise ValueError("'distill' trains a student: put ('student', n_layers) directly before it")
    if "lowrank" in kinds and (kinds.index("lowrank") == 0 or kinds[kinds.index("lowrank") - 1] != "gptq"):
        raise ValueError("'lowrank' compensates quantization error: put it directly after ('gptq', bits)")
    if "lowrank" in kinds and "prune" in kinds:
        raise ValueError("'lowrank' compensation would fill the N:M zeros with dense corrections: use one or the other")
    for k, arg in steps:
        if k == "prune" and arg not in ("2:4", "4:8"):
            raise ValueError(f"('prune', {arg!r}): use '2:4' or '4:8' (the semi-structured patterns hardware runs)")
        if k in ("student", "distill", "lowrank") and (isinstance(arg, bool) or not isinstance(arg, int) or arg < 1):
            what = {"student": "the layers the student keeps", "distill": "training steps", "lowrank": "the rank"}[k]
            raise ValueError(f"({k!r}, {arg!r}): the argument is {what}, an integer >= 1")
        if k == "gptq" and arg not in gptq.GPTQ_BITS:
            raise ValueError(f"('gptq', {arg!r}): bits must be one of {gptq.GPTQ_BITS}")
        if k == "kv" and not isinstance(arg, kvcompress.KVConfig):
            raise TypeError(f"('kv', ...) takes a compresslab.kvcompress.KVConfig, got {type(arg).__name__}")
    return steps


def build(name: str, steps, teacher, calib: torch.Tensor, train_ids: torch.Tensor | None = None,
          memo: dict | None = None, gptq_dir=None, act_norms: dict | None = None, progress: bool = True) -> Built:
    """Apply a recipe to a copy of `teacher` (fp32, dense) -> Built.

    calib: (n, seq) calibration ids; train_ids: the distillation windows. memo (a dict kept across calls): recipes
    that share a prefix reuse it — [("gptq", 3), ("lowrank", 32)] starts from an earlier [("gptq", 3)] instead of
    quantizing again. gptq_dir: lab 02's exported 4-bit group-64 checkpoint; a recipe that starts with ("gptq", 4)
    loads it instead of quantizing (its own calibration, printed) when it exists. act_norms: the teacher's
    lowrank.activation_norms on calib, reused by ("lowrank", r) when it compensates against the teacher itself.
    """
    steps = plan(steps)
    kinds = [k for k, _ in steps]
    keep_references = memo is not None
    memo = {} if memo is None else memo
    start = max((i for i in range(len(steps) + 1) if i == 0 or tuple(steps[:i]) in memo), default=0)
    if start:
        done = memo[tuple(steps[:start])]
        runtime_only = all(k == "kv" for k in kinds[start:])  # nothing left changes the weights: share them
        out = Built(name, done.model if runtime_only else copy.deepcopy(done.model), steps, done.bits, done.nm,
                    done.extra_params, info=dict(done.info, reused=" + ".join(map(str, steps[:start]))))
    else:
        model = teacher if kinds[:1] == ["student"] else copy.deepcopy(teacher)  # make_student copies the teacher
        out = Built(name=name, model=model, steps=steps)
    for i in range(start, len(steps)):
        kind, arg = steps[i]
        model = out.model
        if kind == "student":
            out.model, info = distill.make_student(teacher, calib, n_layers=arg, progress=progress)
            out.info["dropped"] = info["dropped"]
        elif kind == "distill":
            if train_ids is None:
                raise ValueError("a 'distill' step needs train_ids (token windows to train on)")
            hist = distill.distill(model, train_ids, teacher=teacher, steps=arg, lr=2e-4, batch_size=2,
                                   T=1.0, warmup=max(1, arg // 10), progress=progress)
            model.eval()
            out.info["distill_loss"] = hist["loss"][-1]
        elif kind == "prune":
            joint = i + 1 < len(steps) and steps[i + 1][0] == "gptq"
            extra = {"bits": steps[i + 1][1], "group_size": GROUP_SIZE} if joint else {}
            pruning.prune_model(model, calib, "sparsegpt", pattern=arg, inplace=True, progress=progress, **extra)
            out.nm = pruning.parse_pattern(arg)
        elif kind == "gptq":
            if i == 0:
                memo[()] = Built("teacher", teacher, [])  # the reference a later ("lowrank", r) compensates against
            elif "lowrank" in kinds or keep_references:  # a later recipe may add ("lowrank", r) to this one
                memo[tuple(steps[:i])] = Built(name, copy.deepcopy(model), steps[:i], out.bits, out.nm,
                                               out.extra_params, info=dict(out.info))
            if out.nm is None:  # after ("prune", ...) the joint SparseGPT pass has quantized already
                loaded = _load_lab02(gptq_dir, arg) if i == 0 else None
                if loaded is not None:
                    out.model, out.info["gptq"] = loaded, f"lab 02's checkpoint {gptq_dir}"
                else:
                    gptq.quantize_model(model, calib, bits=arg, group_size=GROUP_SIZE, act_order=True, inplace=True,
                                        progress=progress)
            out.bits = arg
        elif kind == "lowrank":
            ref_key = tuple(steps[: i - 1])
            if ref_key not in memo:
                raise RuntimeError(f"no model before the quantization step {steps[i - 1]} to compensate against: "
                                   "build the recipe in one call (or with the same memo)")
            reference = memo[ref_key].model
            norms = act_norms if reference is teacher and act_norms is not None else \
                lowrank.activation_norms(reference, calib, progress=progress)
            added = lowrank.compensate_model(model, reference, arg, norms, progress=progress)
            out.extra_params = sum(added.values())
        elif kind == "kv":
            out.kv = arg
    out.model.eval()
    if start < len(steps) and kinds[-1] != "kv":
        memo[tuple(steps)] = out  # later recipes that extend this one start from it (do not modify out.model)
    return out


def _load_lab02(path, bits: int):
    """Lab 02's exported checkpoint as a float model, if it is a 4-bit group-64 act-order export; else None."""
    import json
    from pathlib import Path

    from .checkpoint import load_gptq

    if path is None or not (Path(path) / "config.json").exists():
        return None
    q = json.loads((Path(path) / "config.json").read_text()).get("quantization_config", {})
    if (q.get("bits"), q.get("group_size"), q.get("desc_act")) != (bits, GROUP_SIZE, True):
        return None
    return load_gptq(path)[0].eval()


def recipe_weight_bytes(model, bits: int = 16, nm: tuple[int, int] | None = None, extra_params: int = 0) -> float:
    """Deployable weight bytes of a recipe's model: deploy.deployed_weight_bytes at the capstone's group of 64."""
    return deploy.deployed_weight_bytes(model, bits, nm, extra_params, GROUP_SIZE)


def recipe_card(rows: list[dict], max_ppl_increase: float = 0.25) -> list[dict]:
    """Pick, from measured rows (method, weight_mb, kv_mb, ppl, probe_acc, bound_tok_s), the recipe for each
    constraint. Only variants within max_ppl_increase of the best perplexity count as 'usable'."""
    if not rows:
        raise ValueError("no measured rows: run the variants first")
    best = min(r["ppl"] for r in rows)
    usable = [r for r in rows if r["ppl"] <= best * (1 + max_ppl_increase)] or rows
    total = lambda r: r["weight_mb"] + r["kv_mb"]  # noqa: E731
    picks = [("memory-bound (fit the most in RAM/VRAM)", min(usable, key=total),
              "smallest weights + KV among variants within {:.0%} of the best perplexity".format(max_ppl_increase)),
             ("latency-bound (batch-1 decode speed)", max(usable, key=lambda r: r["bound_tok_s"]),
              "highest roofline tokens/s (bytes read per token) among the same variants"),
             ("reasoning-sensitive (exact arithmetic)", max(rows, key=lambda r: (r["probe_acc"], -total(r))),
              "best arithmetic-probe accuracy, smaller first on ties")]
    return [{"constraint": c, "recipe": r["method"], "why": why} for c, r, why in picks]


def deployment_bytes(row: dict, context: int, batch: int = 1) -> float:
    """Bytes a deployment of one measured recipe holds: its weights once, plus a KV cache of `context` tokens for each
    of `batch` sequences. row: one of lab 08's capstone rows, with weight_bytes and kv_bytes_per_token (one token of
    one sequence, as its cache stores it).

        stack.deployment_bytes(row, 4096, batch=8)  # the weights + 8 caches of 4096 tokens
    """
    return row["weight_bytes"] + row["kv_bytes_per_token"] * context * batch


def choose_recipe(rows: list[dict], budget_bytes: float, *, context: int = 4096, batch: int = 1) -> dict | None:
    """The measured recipe to deploy under a memory budget (lab 08's exercise 4): among the rows whose
    deployment_bytes(row, context, batch) fit (<= budget_bytes), the one with the lowest perplexity, the one that
    needs fewer bytes on a perplexity tie (the earlier row on a full tie). None when no row fits.

        stack.choose_recipe(rows, 256e6, context=4096, batch=1)["method"]  # e.g. 'GPTQ 4-bit + rank-32 fix'
    """
    fits = [r for r in rows if deployment_bytes(r, context, batch) <= budget_bytes]
    return min(fits, key=lambda r: (r["ppl"], deployment_bytes(r, context, batch)), default=None)
