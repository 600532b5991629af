"""Exercise checkers: run a participant's function on fixed cases, say PASSED / FAILED / NOT DONE, and hand
back the function the rest of the lab should use (theirs if it passed, the reference otherwise).

    compute_qparams = checks.check_qparams(my_qparams)    # prints the verdict, returns a working function
    checks.summary()                                      # table of every exercise checked so far

This file is the harness; the checkers live one module per lab (`checks.lab01` ... `checks.lab08`), their references
in the algorithm modules, and `checks.check_xxx` finds a checker in whichever lab module defines it (imported on
first use, so `import compresslab` stays cheap). Each case is chosen to catch one plausible mistake and its label says
which; tests/test_checks*.py hold the wrong implementations each checker must reject.

Hints come in two tiers: a first failure prints which case failed and by how much, with the checker's hint; a second
failure of the same exercise in the same kernel adds the stronger hint (`more=`), which nearly gives the answer.
With COMPRESSLAB_EXERCISE_LOG set, every verdict is also appended to that file as one JSON line (the tests read it
from notebooks they run as a participant would).
"""

from __future__ import annotations

import importlib
import json
import os
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

STATUS: dict[str, str] = {}  # exercise name -> "passed" | "failed" | "not done"
FAILURES: dict[str, int] = {}  # exercise name -> failed attempts in this kernel (the second one shows `more`)
LABS = ("lab01", "lab02", "lab03", "lab04", "lab05", "lab06", "lab07", "lab08")


def __getattr__(name: str):
    """checks.check_qparams (or a test's checks._spd): looked up in the lab modules, imported on first use."""
    if name.startswith("__"):
        raise AttributeError(name)
    if name in LABS:
        return importlib.import_module(f".{name}", __name__)
    for lab in LABS:
        module = importlib.import_module(f".{lab}", __name__)
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"compresslab.checks has no checker or case helper {name!r} (looked in {', '.join(LABS)})")


def _record(name: str, status: str) -> None:
    STATUS[name] = status
    log = os.environ.get("COMPRESSLAB_EXERCISE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"exercise": name, "status": status}) + "\n")


@dataclass
class Case:
    label: str  # what this case tests, shown when it fails
    args: tuple


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, list):  # a list of weights (lab 03's smooth): the participant may update them in place
        return [_clone(v) for v in x]
    return tuple(_clone(v) for v in x) if isinstance(x, tuple) else x


def _compare(got, expected, atol: float, rtol: float = 0.0) -> tuple[str | None, float]:
    """(None, largest error) if got matches expected, else (a one-line reason, error)."""
    if isinstance(expected, tuple):
        numbers = all(isinstance(e, (int, float)) for e in expected)
        if numbers and isinstance(got, (np.ndarray, torch.Tensor)) and got.ndim == 1:
            got = tuple(got.tolist())  # an array of the numbers unpacks like a tuple
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            what = "numbers" if numbers else "tensors"
            return f"expected a tuple of {len(expected)} {what}, got {type(got).__name__}", float("inf")
        worst = 0.0
        for i, (g, e) in enumerate(zip(got, expected)):
            reason, err = _compare(g, e, atol, rtol)
            if reason:
                return f"output[{i}]: {reason}", err
            worst = max(worst, err)
        return None, worst
    if isinstance(expected, (int, float)):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        elif isinstance(got, (np.ndarray, np.generic)) and np.size(got) == 1:  # np.int64 is not an int
            got = got.item()
        if not isinstance(got, (int, float)):
            return f"expected a number, got {type(got).__name__}", float("inf")
        err = abs(got - expected)
        return (None if err <= atol + rtol * abs(expected) else f"{got!r}, expected {expected!r}"), err
    if not isinstance(got, torch.Tensor):
        return f"expected a torch.Tensor, got {type(got).__name__}", float("inf")
    if tuple(got.shape) != tuple(expected.shape):
        return f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}", float("inf")
    if expected.dtype == torch.bool and got.dtype != torch.bool:
        return f"dtype {got.dtype}, expected a bool mask (torch.bool)", float("inf")
    if expected.dtype == torch.uint8 and got.dtype != torch.uint8:
        return f"dtype {got.dtype}, expected torch.uint8", float("inf")
    if not expected.is_floating_point() and got.is_floating_point():
        return f"dtype {got.dtype}, expected integers ({expected.dtype})", float("inf")
    got, expected = got.double(), expected.double()
    if not torch.isfinite(got).all():
        return "output contains NaN or inf", float("inf")
    err = (got - expected).abs().max().item() if got.numel() else 0.0
    tol = atol + rtol * (expected.abs().max().item() if expected.numel() else 0.0)
    return (None if err <= tol else f"largest |error| = {err:.3g} (tolerance {tol:.2g})"), err


def run_check(name: str, fn: Callable, reference: Callable, cases: list[Case], hint: str,
              atol: float = 1e-5, rtol: float = 0.0, more: str | None = None) -> Callable:
    """Check fn against reference on every case; print the verdict; return fn if it passed, else reference.
    hint is shown with every failure, more (the stronger hint) from the second failure of this exercise on."""
    ref_name = f"{reference.__module__}.{reference.__name__}"
    worst = 0.0
    try:
        for case in cases:
            expected = reference(*_clone(case.args))
            got = fn(*_clone(case.args))
            reason, err = _compare(got, expected, atol, rtol)
            if not reason and getattr(expected, "requires_grad", False) and not getattr(got, "requires_grad", False):
                reason = ("the result carries no gradient: the loss must stay connected to the student's logits "
                          "(no torch.no_grad(), .detach() or .item() on the way)")
            if reason:
                return _fail(name, ref_name, f'case "{case.label}": {reason}', hint, reference, more)
            worst = max(worst, err)
    except NotImplementedError:
        _record(name, "not done")
        print(f"⏳ {name}: NOT DONE yet. Using the reference ({ref_name}) so the lab continues; "
              "come back, fill in the function, and re-run its cell and this one.")
        return reference
    except Exception as err:  # a crash in the participant's code is a failure, not a dead end
        where = traceback.extract_tb(err.__traceback__)[-1]
        return _fail(name, ref_name, f"raised {type(err).__name__}: {err} (line {where.lineno}: {where.line})",
                     hint, reference, more)
    _record(name, "passed")
    print(f"✅ {name}: PASSED all {len(cases)} cases (largest |error| {worst:.1e}). "
          "The lab uses your function from here on.")
    return fn


def _fail(name: str, ref_name: str, reason: str, hint: str, reference: Callable, more: str | None = None) -> Callable:
    _record(name, "failed")
    FAILURES[name] = FAILURES.get(name, 0) + 1
    bar = "!" * 78
    if more and FAILURES[name] > 1:
        hint = f"{hint}\n   stronger hint (attempt {FAILURES[name]}): {more}"
    elif more:
        hint = f"{hint}\n   (fix it and re-run: a second failure shows a stronger hint)"
    print(f"{bar}\n❌ {name}: FAILED\n   {reason}\n   hint: {hint}\n"
          f"   -> using the reference ({ref_name}) instead, so the rest of the lab still runs.\n{bar}")
    return reference


def run_adapted(name: str, fn: Callable, reference: Callable, adapt: Callable, cases: list[Case], hint: str,
                atol: float = 1e-5, rtol: float = 0.0, more: str | None = None) -> Callable:
    """run_check on adapt(fn(*args), *args) against adapt(reference(*args), *args), for results run_check cannot
    compare as they come (a list inside a tuple, a dtype to keep); adapt raises, with a message, on a wrong form.
    Returns fn itself if it passed, else the reference."""
    def got(*args):
        return adapt(fn(*args), *args)

    def expected(*args):
        return adapt(reference(*args), *args)

    got.__name__ = getattr(fn, "__name__", "fn")
    expected.__module__, expected.__name__ = reference.__module__, reference.__name__
    chosen = run_check(name, got, expected, cases, hint, atol, rtol, more)
    return fn if chosen is got else reference


# ----------------------------------------------------------------------------- case builders shared by labs


def _spd(n: int, seed: int, dead: int | None = None) -> torch.Tensor:
    """A Hessian-like symmetric positive definite (n, n) matrix: 2/N X^T X of random inputs with uneven scales."""
    g = torch.Generator().manual_seed(seed)
    col_scale = torch.linspace(0.2, 3.0, n)[torch.randperm(n, generator=g)]  # distinct, in no particular order
    x = torch.randn(4 * n, n, generator=g) * col_scale  # (tokens, n)
    if dead is not None:
        x[:, dead] = 0
    return 2 / x.shape[0] * x.t() @ x


def _hinv_upper(n: int, seed: int) -> torch.Tensor:
    """The upper Cholesky factor of the inverse of a dampened _spd: what GPTQ's and SparseGPT's loops consume."""
    H = _spd(n, seed) + 0.01 * torch.eye(n)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def summary() -> dict[str, str]:
    """Print and return the status of every exercise checked in this kernel."""
    marks = {"passed": "✅", "failed": "❌", "not done": "⏳"}
    for name, status in STATUS.items():
        print(f"{marks[status]} {status:9s} {name}")
    done = sum(s == "passed" for s in STATUS.values())
    print(f"{done}/{len(STATUS)} exercises passed")
    return dict(STATUS)


__all__ = ["Case", "FAILURES", "LABS", "STATUS", "run_adapted", "run_check", "summary"]
