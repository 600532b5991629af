"""Each lab's expected figures, per mode, and the "your numbers vs expected" cell at the end of every lab.

    cl.expected.compare("02", MODEL, env)   # prints this run's rows beside the reference, flags what is out of band

The reference files live in compresslab/expected/, one per lab and mode: `NN_name.quick-cpu.json` (quick mode on a
CPU), `NN_name.full-cpu.json`, and `NN_name.<mode>-<gpu>.json` (e.g. `full-nvidia-h100-80gb-hbm3`) only once a run
on that GPU was measured. They are written by `tools/expected_figures.py` from the results rows of real runs (never
by hand) and read by the tests, which hold each quick-mode solution run to its quick-cpu file.

A figure is in band when it is within the file's noise band of the reference: perplexity within a relative 1 %,
probe accuracy within two answers of the probe's n, weight MB within rounding. Runs on one machine reproduce to the
last digit, but another CPU's float kernels (AVX2 vs AVX-512, AMD vs Intel, MKL's code paths) move the calibrated
methods far more than 1 %: GPTQ, static activation scales and SparseGPT moved by up to 13 % between two 2-core
sandboxes in quick mode, and the probe answers with them (3 of the capstone's 16 questions, 4 of the GPTQ lab's
32). So a file may hold one run per CPU it was measured on (`also_measured_on`, added with
`tools/expected_figures.py --also`): a row's band is then the range those CPUs measured, widened on each side by half
its width or the default band, whichever is larger.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

FOLDER = Path(__file__).with_name("expected")
KEY = ("method", "bits", "group_size")
# metric -> (kind, width): "rel" is a fraction of the reference, "abs" an absolute difference
BANDS = {"ppl": ("rel", 0.01), "probe_acc": ("abs", 0.07), "weight_mb": ("abs", 0.051)}


def mode_of(env) -> str:
    """'quick-cpu' / 'full-cpu' on a CPU, 'quick-<gpu>' / 'full-<gpu>' on a GPU (its name, lower case, dashes)."""
    mode = "quick" if env.quick else "full"
    if env.device == "cpu" or not env.gpu_name:
        return f"{mode}-cpu"
    return f"{mode}-" + re.sub(r"[^a-z0-9]+", "-", env.gpu_name.lower()).strip("-")


def path(lab: str, mode: str) -> Path | None:
    """The reference file of lab 'NN' in this mode, or None when that mode was never measured."""
    if not re.fullmatch(r"\d\d", str(lab)):
        raise ValueError(f"lab must be a two-digit lab number such as '02', got {lab!r}")
    found = sorted(FOLDER.glob(f"{lab}_*.{mode}.json"))
    return found[0] if found else None


def load(lab: str, mode: str) -> dict | None:
    p = path(lab, mode)
    return json.loads(p.read_text()) if p else None


def _none_if_nan(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def _key(row: dict) -> tuple:
    """(method, bits, group_size); a NaN (what a DataFrame makes of None) counts as None."""
    return tuple(_none_if_nan(row.get(k)) for k in KEY)


def _bands(reference: dict) -> dict:
    """BANDS, with the reference file's own bands where it states them."""
    return {**BANDS, **{k: tuple(v) for k, v in reference.get("bands", {}).items()}}


def _values(ref: dict, metric: str) -> list:
    """A reference row's figure of `metric` on every CPU the file was measured on (the file's machine first)."""
    return [_none_if_nan(v) for v in [ref.get(metric), *(a.get(metric) for a in ref.get("also", []))]]


def _tolerance(metric: str, ref: dict, bands: dict) -> tuple[float, float, float, bool] | None:
    """(lo, hi, tol, spread): a figure is in band when lo - tol <= figure <= hi + tol; spread: the CPUs differ by more
    than the default band (then tol is half their range). None when the row has no such figure."""
    values = _values(ref, metric)
    if values[0] is None:
        return None
    values = [v for v in values if v is not None]
    lo, hi = min(values), max(values)
    kind, width = bands[metric]
    tol = width * abs(values[0]) if kind == "rel" else width
    return lo, hi, max(tol, (hi - lo) / 2), (hi - lo) / 2 > tol


def _in_band(metric: str, got, ref: dict, bands: dict) -> bool:
    got, band = _none_if_nan(got), _tolerance(metric, ref, bands)
    if band is None or got is None:
        return band is None and got is None
    lo, hi, tol, _ = band
    return math.isfinite(got) and lo - tol - 1e-12 <= got <= hi + tol + 1e-12


def _expected_text(metric: str, ref: dict, bands: dict):
    """The reference figure, or 'lo–hi' where the file's CPUs differ by more than the default band."""
    band = _tolerance(metric, ref, bands)
    if band is None or not band[3]:
        return _values(ref, metric)[0]
    return f"{band[0]:g}–{band[1]:g}"


def differences(rows: list[dict], reference: dict) -> list[str]:
    """Every way rows differ from the reference beyond its bands: a missing or extra row, a figure out of band."""
    bands = _bands(reference)
    want = {_key(r): r for r in reference["rows"]}
    got = {_key(r): r for r in rows}
    problems = [f"missing: {k[0]!r} (bits {k[1]}, group {k[2]}) is in the reference but was not measured"
                for k in want if k not in got]
    problems += [f"extra: {k[0]!r} (bits {k[1]}, group {k[2]}) was measured but is not in the reference"
                 for k in got if k not in want]
    for k in want.keys() & got.keys():
        for metric in bands:
            if not _in_band(metric, got[k].get(metric), want[k], bands):
                problems.append(f"{k[0]!r}: {metric} {got[k].get(metric)} vs expected "
                                f"{_expected_text(metric, want[k], bands)} (band {_band_text(metric, bands, want[k])})")
    return problems


def _band_text(metric: str, bands: dict, ref: dict | None = None) -> str:
    kind, width = bands[metric]
    if ref is not None and (band := _tolerance(metric, ref, bands)) and band[3]:
        return f"the {len(_values(ref, metric))} CPUs' range ±{band[2]:.3g}"
    return f"±{width:.0%}" if kind == "rel" else f"±{width:g}"


def machines(reference: dict) -> str:
    """The CPUs (or GPU) a reference file was measured on, in words."""
    also = [f"{a['machine']} ({a['measured']})" for a in reference.get("also_measured_on", [])]
    return "; ".join([f"{reference['machine']} ({reference['measured']})", *also])


def this_cpu() -> str:
    """This machine's CPU model as the OS names it ('' when it does not say): what moves the calibrated figures."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def compare(lab: str, model: str, env, rows: list[dict] | None = None):
    """Print this run's rows of lab `lab` beside the reference for this mode and machine; flag what is out of band.
    Returns the table (pandas), or None when there is no reference for this mode or model."""
    import pandas as pd

    from . import results

    mode = mode_of(env)
    reference = load(lab, mode)
    if rows is None:
        rows = results.rows(lab=lab, model=model, quick=env.quick)
    if reference is None:
        print(f"No expected figures for lab {lab} in mode {mode} yet (only measured modes have a reference file): "
              "your numbers are the reference. tools/expected_figures.py writes one from a run.")
        return None
    if model != reference["model"]:
        print(f"The reference for lab {lab} ({mode}) was measured on {reference['model']}, not {model}: "
              "nothing to compare.")
        return None
    bands = _bands(reference)
    mine = {_key(r): r for r in rows}
    table = []
    for ref in reference["rows"]:
        got = mine.get(_key(ref), {})
        line = {"method": ref["method"], "bits": ref["bits"], "group": ref["group_size"]}
        flags = []
        for metric in bands:
            if ref.get(metric) is None and _none_if_nan(got.get(metric)) is None:
                continue
            line[metric] = got.get(metric)
            line[f"expected {metric}"] = _expected_text(metric, ref, bands)
            if not _in_band(metric, got.get(metric), ref, bands):
                flags.append(metric)
        line["check"] = "not run" if not got else ("⚠ " + ", ".join(flags) if flags else "✓")
        table.append(line)
    df = pd.DataFrame(table)
    out = [line for line in table if line["check"] != "✓"]
    print(f"Lab {lab}, mode {mode}: reference measured on {machines(reference)}; this machine: "
          f"{this_cpu() or 'CPU not named'}; bands: " + ", ".join(f"{m} {_band_text(m, bands)}" for m in bands)
          + (" (a row the CPUs measured differently: their range, widened)" if reference.get("also_measured_on")
             else ""))
    print("every figure within its band" if not out else
          f"{len(out)} of {len(table)} rows outside the band or not run: a different model, mode, seed or edited "
          "cell explains most, and a CPU unlike the reference's moves the calibrated methods (GPTQ, SparseGPT, "
          "static activation scales) by several %; otherwise compare your exercise outputs with the reference")
    return df


def modes(lab: str) -> list[str]:
    """Every mode lab 'NN' has a reference file for, e.g. ['full-cpu', 'quick-cpu']."""
    if not re.fullmatch(r"\d\d", str(lab)):
        raise ValueError(f"lab must be a two-digit lab number such as '02', got {lab!r}")
    return sorted(p.name.split(".")[1] for p in FOLDER.glob(f"{lab}_*.*.json"))


def show(lab: str, model: str, env, contains: str | tuple, metric: str | tuple = "ppl", rows: list[dict] | None = None,
         exclude: tuple = ()):
    """The reference figures a discussion cell talks about, for the mode this run is in and every other measured mode,
    beside this run's own: the lab's prose names no figure of one mode, the table shows them all.

        cl.expected.show("03", MODEL, env, "SmoothQuant")   # the rows whose method contains 'SmoothQuant'
        cl.expected.show("01", MODEL, env, ("fp32", "RTN"), metric=("ppl", "probe_acc"))  # either; both metrics

    exclude: parts of method names to leave out (rows a later section measures). Returns the table (pandas), or None
    when no reference file of this lab holds such a row."""
    import pandas as pd

    from . import results

    parts = (contains,) if isinstance(contains, str) else tuple(contains)
    if not parts or not all(isinstance(p, str) and p for p in parts):
        raise ValueError(f"contains must be a non-empty part of a method name, e.g. 'SmoothQuant', or a tuple of "
                         f"them, got {contains!r}")
    if isinstance(exclude, str) or not all(isinstance(x, str) and x for x in exclude):
        raise ValueError(f"exclude must be a tuple of parts of method names, e.g. ('tuned',), got {exclude!r}")
    metrics = (metric,) if isinstance(metric, str) else tuple(metric)
    if not metrics or any(m not in BANDS for m in metrics):
        raise ValueError(f"metric must be one of {sorted(BANDS)} or a tuple of them, got {metric!r}")
    mine_mode = mode_of(env)
    refs = {m: load(lab, m) for m in sorted(modes(lab), key=lambda m: m != mine_mode)}  # this run's mode first
    refs = {m: r for m, r in refs.items() if r["model"] == model}
    by_key = {m: {_key(r): r for r in ref["rows"]} for m, ref in refs.items()}
    if rows is None:
        rows = results.rows(lab=lab, model=model, quick=env.quick)
    mine = {_key(r): r for r in rows}
    keys = []  # in the order the references list them, this mode's file first
    for m in refs:
        keys += [_key(r) for r in refs[m]["rows"] if any(p in str(r["method"]) for p in parts)
                 and not any(x in str(r["method"]) for x in exclude) and _key(r) not in keys]
    if not keys:
        print(f"no reference row of lab {lab} ({model}) has {contains!r} in its method name "
              f"(measured modes: {', '.join(refs) or 'none'})")
        return None
    table = []
    for k in keys:
        line = {"method": k[0], "bits": k[1], "group": k[2]}
        for metric in metrics:
            name = "" if len(metrics) == 1 else f"{metric} "
            line[f"{name}yours ({mine_mode})"] = mine.get(k, {}).get(metric)
            for m in refs:
                line[f"{name}expected {m}"] = by_key[m].get(k, {}).get(metric)
        table.append(line)
    where = "; ".join(f"{m} on {machines(r)}" for m, r in refs.items())
    print(f"{', '.join(metrics)}: this run ({mine_mode}) beside the reference of every measured mode ({where})")
    bands = {m: _bands(r) for m, r in refs.items()}
    moved = [f"{k[0]} ({k[1]} bits, group {k[2]}) {metric} {_expected_text(metric, by_key[m][k], bands[m])} in {m}"
             for k in keys for m in refs for metric in metrics
             if k in by_key[m] and isinstance(_expected_text(metric, by_key[m][k], bands[m]), str)]
    if moved:
        print("the reference's value is its first CPU's; the other CPUs measured: " + "; ".join(moved))
    return pd.DataFrame(table)


def write(stem: str, mode: str, rows: list[dict], *, model: str, machine: str, measured: str, command: str,
          bands: dict | None = None) -> Path:
    """Write the reference file of lab `stem` (e.g. '02_gptq') in `mode` from a run's results rows; bands override
    BANDS per metric (the tool widens probe accuracy to two answers of the mode's probe size)."""
    if not re.fullmatch(r"\d\d_\w+", stem):
        raise ValueError(f"stem must be a lab's file stem such as '02_gptq', got {stem!r}")
    keep = [{k: r.get(k) for k in (*KEY, *BANDS)} for r in rows if r.get("model") == model]
    if not keep:
        raise ValueError(f"no rows of model {model!r} to write for {stem} ({mode})")
    if len({_key(r) for r in keep}) != len(keep):
        raise ValueError(f"{stem}: two rows share (method, bits, group_size): the reference needs them unique")
    FOLDER.mkdir(exist_ok=True)
    out = FOLDER / f"{stem}.{mode}.json"
    doc = {"lab": stem[:2], "mode": mode, "model": model, "machine": machine, "measured": measured,
           "command": command, "bands": {k: list(v) for k, v in {**BANDS, **(bands or {})}.items()}, "rows": keep}
    _dump(doc, out)
    return out


def add_machine(lab: str, mode: str, rows: list[dict], *, model: str, machine: str, measured: str) -> Path:
    """Add a run on another CPU to lab 'NN''s reference file in `mode`: the file keeps its figures (its first
    machine's) and each row gains this machine's under "also"; a machine already listed is replaced. The run must
    measure exactly the file's rows: a method added or renamed needs a fresh file, measured again on each CPU."""
    doc = load(lab, mode)
    if doc is None:
        raise ValueError(f"lab {lab} has no {mode} reference to add a machine to: write it first "
                         "(tools/expected_figures.py without --also)")
    keep = {_key(r): {m: r.get(m) for m in BANDS} for r in rows if r.get("model") == model}
    if doc["model"] != model or not keep:
        raise ValueError(f"no rows of model {doc['model']!r} in the run to add to lab {lab}'s {mode} reference")
    want = [_key(r) for r in doc["rows"]]
    if set(keep) != set(want):
        odd = sorted(map(str, set(keep) ^ set(want)))
        raise ValueError(f"lab {lab}: the run and the {mode} reference measure different rows ({', '.join(odd)}): "
                         "write a fresh file from one run, then add the other CPUs' runs of the same code")
    also = doc.setdefault("also_measured_on", [])
    names = [a["machine"] for a in also]
    if machine == doc["machine"]:
        raise ValueError(f"{machine!r} is the file's own machine: rewrite the file instead of adding it")
    slot = names.index(machine) if machine in names else len(also)
    also[slot:slot + 1] = [{"machine": machine, "measured": measured}]
    for r in doc["rows"]:
        r.setdefault("also", [])[slot:slot + 1] = [keep[_key(r)]]
    out = path(lab, mode)
    _dump(doc, out)
    return out


def retire_rows(lab: str, mode: str, rows: list[dict], *, model: str, machine: str) -> tuple[Path, list[tuple]]:
    """The code stopped measuring some of lab 'NN''s rows in `mode` (e.g. a variant moved to full mode): remove them
    from the reference file and keep every machine's figures of the rest. `rows` is a run of the new code on one of
    the file's machines; it must measure a subset of the file's rows and reproduce that machine's figures of each
    (within the file's band): then the other machines' figures still hold. A row added or changed needs a fresh file.
    Returns (the file, the keys removed)."""
    doc = load(lab, mode)
    if doc is None:
        raise ValueError(f"lab {lab} has no {mode} reference to retire rows from")
    got = {_key(r): r for r in rows if r.get("model") == model}
    if doc["model"] != model or not got:
        raise ValueError(f"no rows of model {doc['model']!r} in the run to check lab {lab}'s {mode} reference with")
    want = {_key(r): r for r in doc["rows"]}
    if extra := sorted(map(str, got.keys() - want.keys())):
        raise ValueError(f"lab {lab}: the run measures rows the {mode} reference lacks ({', '.join(extra)}): "
                         "write a fresh file from one run, then add the other CPUs' runs of the same code")
    gone = [k for k in want if k not in got]
    if not gone:
        raise ValueError(f"lab {lab}: the run measures every row of the {mode} reference: nothing to retire")
    names = [doc["machine"], *(a["machine"] for a in doc.get("also_measured_on", []))]
    if machine not in names:
        raise ValueError(f"{machine!r} did not measure lab {lab}'s {mode} reference ({'; '.join(names)}): run the "
                         "new code on one of those machines, or write a fresh file")
    slot = names.index(machine)
    bands = _bands(doc)
    off = []
    for k, r in got.items():
        mine = want[k] if slot == 0 else want[k]["also"][slot - 1]
        for metric in bands:  # this machine's own figure, its plain band (not the CPUs' range)
            if not _in_band(metric, r.get(metric), {metric: mine.get(metric)}, bands):
                off.append(f"{k[0]!r} (bits {k[1]}): {metric} {r.get(metric)} vs {mine.get(metric)}")
    if off:
        raise ValueError(f"lab {lab}: the new code moved figures on {machine!r} ({'; '.join(off)}): the other "
                         "machines' figures no longer hold; write a fresh file and measure it on each CPU again")
    doc["rows"] = [r for r in doc["rows"] if _key(r) in got]
    out = path(lab, mode)
    _dump(doc, out)
    return out, gone


def _dump(doc: dict, out: Path) -> None:
    """One field, and one row, per line: a reference file diffs by row."""
    head = {k: v for k, v in doc.items() if k != "rows"}
    lines = [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    lines += [' "rows": [', ",\n".join(f"  {json.dumps(r)}" for r in doc["rows"]), " ]"]
    out.write_text("{\n" + "\n".join(lines) + "\n}\n")
