"""compresslab.expected: the per-lab, per-mode reference figures and the "your numbers vs expected" cell.

The quick-mode solution runs themselves are held to the committed quick-cpu files in tests/test_notebooks.py; here,
the comparison logic, the writer, and the committed files' form."""

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from compresslab import expected

ROOT = Path(__file__).resolve().parents[1]
STEMS = {p.stem for p in (ROOT / "solutions").glob("[0-9][0-9]_*.py")}
CPU_QUICK = SimpleNamespace(quick=True, device="cpu", gpu_name=None)


def _reference(rows, bands=None):
    return {"model": "m", "machine": "test box", "measured": "today", "bands": bands or {}, "rows": rows}


ROWS = [{"method": "fp32", "bits": 32, "group_size": None, "ppl": 37.1, "probe_acc": 0.34, "weight_mb": 538.1},
        {"method": "RTN", "bits": 4, "group_size": 64, "ppl": 50.9, "probe_acc": 0.06, "weight_mb": 171.4},
        {"method": "RTN", "bits": 3, "group_size": 64, "ppl": 120.5, "probe_acc": 0.0, "weight_mb": 158.2}]


def test_mode_names():
    assert expected.mode_of(CPU_QUICK) == "quick-cpu"
    assert expected.mode_of(SimpleNamespace(quick=False, device="cpu", gpu_name=None)) == "full-cpu"
    h100 = SimpleNamespace(quick=False, device="cuda", gpu_name="NVIDIA H100 80GB HBM3")
    assert expected.mode_of(h100) == "full-nvidia-h100-80gb-hbm3"


def test_the_same_rows_have_no_differences():
    assert expected.differences([dict(r) for r in ROWS], _reference(ROWS)) == []


@pytest.mark.parametrize("change, found", [
    (lambda rows: rows[1].update(ppl=50.9 * 1.011), "'RTN': ppl"),           # just outside 1 %
    (lambda rows: rows[1].update(probe_acc=0.06 + 0.08), "'RTN': probe_acc"),
    (lambda rows: rows[0].update(weight_mb=538.2), "'fp32': weight_mb"),     # bytes counted differently
    (lambda rows: rows.pop(2), "missing: 'RTN' (bits 3"),                     # a row the reference has
    (lambda rows: rows.append(dict(ROWS[0], method="GPTQ")), "extra: 'GPTQ'"),
    (lambda rows: rows[1].update(ppl=float("nan")), "'RTN': ppl"),
    (lambda rows: rows[1].update(ppl=None), "'RTN': ppl"),
])
def test_differences_flag_each_kind_of_change(change, found):
    rows = [dict(r) for r in ROWS]
    change(rows)
    problems = expected.differences(rows, _reference(ROWS))
    assert len(problems) == 1 and problems[0].startswith(found), problems


def test_changes_inside_the_band_pass_and_the_file_bands_win():
    rows = [dict(r) for r in ROWS]
    rows[1]["ppl"] = 50.9 * 1.009
    rows[1]["probe_acc"] = 0.06 + 0.06
    assert expected.differences(rows, _reference(ROWS)) == []
    assert expected.differences(rows, _reference(ROWS, bands={"ppl": ["rel", 0.005]}))[0].startswith("'RTN': ppl")


def test_compare_prints_the_table_and_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(expected, "FOLDER", tmp_path)
    expected.write("09_demo", "quick-cpu", [dict(r, model="m", lab="09") for r in ROWS], model="m",
                   machine="test box", measured="today", command="test")
    mine = [dict(r) for r in ROWS[:2]]
    mine[1]["ppl"] = 60.0
    df = expected.compare("09", "m", CPU_QUICK, rows=mine)
    out = capsys.readouterr().out
    assert list(df["check"]) == ["✓", "⚠ ppl", "not run"]
    assert "2 of 3 rows outside the band or not run" in out and "test box" in out
    assert expected.compare("09", "other-model", CPU_QUICK, rows=mine) is None
    assert "not other-model" in capsys.readouterr().out
    assert expected.compare("09", "m", SimpleNamespace(quick=False, device="cpu", gpu_name=None), rows=mine) is None
    assert "No expected figures for lab 09 in mode full-cpu" in capsys.readouterr().out


def test_bad_input_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(expected, "FOLDER", tmp_path)
    with pytest.raises(ValueError, match="two-digit lab number"):
        expected.path("2", "quick-cpu")
    with pytest.raises(ValueError, match="lab's file stem"):
        expected.write("gptq", "quick-cpu", ROWS, model="m", machine="x", measured="d", command="c")
    with pytest.raises(ValueError, match="no rows of model"):
        expected.write("02_gptq", "quick-cpu", [dict(r, model="other") for r in ROWS], model="m", machine="x",
                       measured="d", command="c")
    with pytest.raises(ValueError, match="unique"):
        expected.write("02_gptq", "quick-cpu", [dict(ROWS[0], model="m")] * 2, model="m", machine="x",
                       measured="d", command="c")


def test_the_tool_writes_one_file_per_lab_from_results_rows(tmp_path, monkeypatch):
    results = tmp_path / "results.jsonl"
    rows = [dict(r, lab="01", model="smollm2-135m", quick=True) for r in ROWS]
    rows += [dict(ROWS[0], lab="01", model="smollm2-135m", quick=False)]  # another mode: left out
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "expected"
    code = ("import sys; sys.path.insert(0, 'tools'); import expected_figures as t; from pathlib import Path; "
            f"t.expected.FOLDER = Path({str(out)!r}); "
            f"raise SystemExit(t.main(['quick-cpu', {str(results)!r}, '--machine', 'test box']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "01_quantization_fundamentals.quick-cpu.json").read_text())
    assert doc["machine"] == "test box" and len(doc["rows"]) == 3
    assert doc["bands"]["probe_acc"] == ["abs", round(2 / 32 + 1e-3, 4)]  # two answers of the quick probe


@pytest.mark.parametrize("path", sorted((ROOT / "shared/compresslab/expected").glob("*.json")), ids=lambda p: p.name)
def test_committed_reference_files_are_well_formed(path):
    stem, mode = path.name.removesuffix(".json").split(".")
    assert stem in STEMS, f"{path.name}: no lab source solutions/{stem}.py"
    assert re.fullmatch(r"(quick|full)-[a-z0-9-]+", mode)
    doc = json.loads(path.read_text())
    assert doc["lab"] == stem[:2] and doc["mode"] == mode and doc["machine"] and doc["rows"]
    keys = [(r["method"], r["bits"], r["group_size"]) for r in doc["rows"]]
    assert len(set(keys)) == len(keys)
    assert expected.differences(doc["rows"], doc) == []
    also = doc.get("also_measured_on", [])
    assert all(a["machine"] and a["machine"] != doc["machine"] and a["measured"] for a in also)
    assert all(len(r.get("also", [])) == len(also) for r in doc["rows"]), "every row holds each machine's figures"


def test_show_puts_this_run_beside_every_measured_mode(tmp_path, monkeypatch, capsys):
    """The discussion cells name no figure of one mode: show() prints the rows they discuss for every mode."""
    monkeypatch.setattr(expected, "FOLDER", tmp_path)
    quick = [dict(r, model="m") for r in ROWS]
    full = [dict(r, model="m", ppl=r["ppl"] * 0.9) for r in ROWS[:2]]
    expected.write("02_gptq", "quick-cpu", quick, model="m", machine="box A", measured="d", command="c")
    expected.write("02_gptq", "full-cpu", full, model="m", machine="box B", measured="d", command="c")
    assert expected.modes("02") == ["full-cpu", "quick-cpu"]
    mine = [dict(ROWS[1], ppl=51.0)]
    df = expected.show("02", "m", CPU_QUICK, "RTN", rows=mine)
    assert list(df.columns) == ["method", "bits", "group", "yours (quick-cpu)", "expected quick-cpu",
                                "expected full-cpu"]
    assert df["yours (quick-cpu)"].tolist()[0] == 51.0 and df["yours (quick-cpu)"].isna().tolist()[1]
    assert df["expected quick-cpu"].tolist() == [50.9, 120.5]
    assert df["expected full-cpu"].tolist()[0] == pytest.approx(50.9 * 0.9) and df["expected full-cpu"].isna()[1]
    assert "box A" in capsys.readouterr().out
    full_env = SimpleNamespace(quick=False, device="cpu", gpu_name=None)
    assert list(expected.show("02", "m", full_env, "RTN", rows=[]).columns)[3:] == [
        "yours (full-cpu)", "expected full-cpu", "expected quick-cpu"]  # the running mode's reference first
    assert expected.show("02", "m", CPU_QUICK, "GPTQ", rows=[]) is None
    assert "no reference row" in capsys.readouterr().out
    assert expected.show("02", "m", CPU_QUICK, ("fp32", "RTN"), rows=[])["method"].tolist() == ["fp32", "RTN", "RTN"]
    assert expected.show("02", "m", CPU_QUICK, ("fp32", "RTN"), rows=[], exclude=("RTN",))["method"].tolist() == ["fp32"]
    with pytest.raises(ValueError, match="exclude must be a tuple"):
        expected.show("02", "m", CPU_QUICK, "RTN", exclude="fp32")
    assert expected.show("02", "other model", CPU_QUICK, "RTN", rows=[]) is None
    for bad in ("", (), ("RTN", ""), ("RTN", 3)):
        with pytest.raises(ValueError, match="part of a method name"):
            expected.show("02", "m", CPU_QUICK, bad)
    for bad in ("perplexity", (), ("ppl", "acc")):
        with pytest.raises(ValueError, match="metric must be one of"):
            expected.show("02", "m", CPU_QUICK, "RTN", metric=bad)
    both = expected.show("02", "m", CPU_QUICK, "RTN", metric=("ppl", "probe_acc"), rows=mine)
    assert list(both.columns)[3:6] == ["ppl yours (quick-cpu)", "ppl expected quick-cpu", "ppl expected full-cpu"]
    assert both["probe_acc expected quick-cpu"].tolist() == [0.06, 0.0]
    with pytest.raises(ValueError, match="two-digit"):
        expected.modes("2")


def test_compare_and_show_read_the_results_table_as_recorded(tmp_path, monkeypatch, capsys):
    """A lab's last cell reads its rows from the results table. Through a DataFrame a missing group size (fp32, the
    W8A8 rows, a KV cache) became NaN and matched no reference row: every such row read "not run". Read as recorded."""
    from compresslab import results

    monkeypatch.setattr(expected, "FOLDER", tmp_path)
    monkeypatch.setenv("COMPRESSLAB_RESULTS", str(tmp_path / "results.jsonl"))
    for r in ROWS:
        results.record(lab="09", model="m", quick=True, **{k: r[k] for k in ("method", "bits", "group_size", "ppl",
                                                                              "probe_acc", "weight_mb")})
    expected.write("09_demo", "quick-cpu", [dict(r, model="m") for r in ROWS], model="m", machine="box",
                   measured="d", command="c")
    assert results.rows(lab="09")[0]["group_size"] is None
    df = expected.compare("09", "m", CPU_QUICK)
    assert list(df["check"]) == ["✓", "✓", "✓"], df
    assert "every figure within its band" in capsys.readouterr().out
    shown = expected.show("09", "m", CPU_QUICK, "fp32")
    assert shown["yours (quick-cpu)"].tolist() == [37.1]
    # rows handed over from a DataFrame (NaN for None) match too
    nan_rows = results.table(lab="09").to_dict("records")
    assert expected.differences(nan_rows, expected.load("09", "quick-cpu")) == []


def test_a_second_cpu_widens_each_row_to_the_range_both_measured(tmp_path, monkeypatch, capsys):
    """Two CPUs' float kernels moved GPTQ 3-bit by 12 % in quick mode: a file measured on both holds both figures,
    and a row's band is their range widened by half its width (or the default band); rows both measured alike stay
    at the default band."""
    monkeypatch.setattr(expected, "FOLDER", tmp_path)
    expected.write("09_demo", "quick-cpu", [dict(r, model="m") for r in ROWS], model="m", machine="box A",
                   measured="d1", command="c")
    other = [dict(r, model="m") for r in ROWS]
    other[2].update(ppl=135.0, probe_acc=0.125)  # RTN 3-bit: 120.5 on box A
    other[0].update(ppl=37.101)  # fp32: a last-digit difference, inside the default band: shown as box A's figure
    out = expected.add_machine("09", "quick-cpu", other, model="m", machine="box B", measured="d2")
    doc = json.loads(out.read_text())
    assert doc["machine"] == "box A" and doc["also_measured_on"] == [{"machine": "box B", "measured": "d2"}]
    assert doc["rows"][2]["ppl"] == 120.5 and doc["rows"][2]["also"] == [{"ppl": 135.0, "probe_acc": 0.125,
                                                                          "weight_mb": 158.2}]
    ref = expected.load("09", "quick-cpu")
    for ppl, ok in [(120.5, True), (135.0, True), (113.3, True), (142.2, True), (113.2, False), (142.3, False)]:
        rows = [dict(r) for r in ROWS]
        rows[2]["ppl"] = ppl
        problems = expected.differences(rows, ref)
        assert (problems == []) == ok, (ppl, problems)
        if not ok:
            assert problems[0].startswith("'RTN': ppl") and "120.5–135" in problems[0] and "range" in problems[0]
    rows = [dict(r) for r in ROWS]
    rows[1]["ppl"] = 50.9 * 1.011  # RTN 4-bit: both CPUs 50.9, so still the 1 % band
    assert expected.differences(rows, ref)[0].startswith("'RTN': ppl")
    rows = [dict(r) for r in ROWS]
    rows[2]["probe_acc"] = 0.125 + 0.0625 + 0.01  # probe range 0-0.125 widened by max(0.07, 0.0625)
    assert expected.differences(rows, ref)[0].startswith("'RTN': probe_acc")
    # again on box B replaces its figures; the file's own machine, other rows, or no file: an error naming the fix
    other[2]["ppl"] = 130.0
    expected.add_machine("09", "quick-cpu", other, model="m", machine="box B", measured="d3")
    doc = expected.load("09", "quick-cpu")
    assert len(doc["also_measured_on"]) == 1 and doc["rows"][2]["also"][0]["ppl"] == 130.0
    with pytest.raises(ValueError, match="own machine"):
        expected.add_machine("09", "quick-cpu", other, model="m", machine="box A", measured="d")
    with pytest.raises(ValueError, match="different rows"):
        expected.add_machine("09", "quick-cpu", other[:2], model="m", machine="box C", measured="d")
    with pytest.raises(ValueError, match="write it first"):
        expected.add_machine("09", "full-cpu", other, model="m", machine="box C", measured="d")
    with pytest.raises(ValueError, match="no rows of model"):
        expected.add_machine("09", "quick-cpu", other, model="n", machine="box C", measured="d")
    # what a participant sees: the range in the table, both machines and this CPU in the header
    capsys.readouterr()
    df = expected.compare("09", "m", CPU_QUICK, rows=[dict(r) for r in ROWS])
    out = capsys.readouterr().out
    assert df["expected ppl"].tolist() == [37.1, 50.9, "120.5–130"] and list(df["check"]) == ["✓"] * 3
    assert "box A (d1); box B (d3)" in out and "this machine:" in out
    expected.show("09", "m", CPU_QUICK, "RTN", rows=[])
    assert "other CPUs measured: RTN (3 bits, group 64) ppl 120.5–130 in quick-cpu" in capsys.readouterr().out
    expected.show("09", "m", CPU_QUICK, "fp32", rows=[])
    assert "other CPUs measured" not in capsys.readouterr().out


def test_the_tool_adds_a_second_machine(tmp_path):
    results = tmp_path / "results.jsonl"
    out = tmp_path / "expected"

    def tool(rows, *extra):
        results.write_text("".join(json.dumps(dict(r, lab="01", model="smollm2-135m", quick=True)) + "\n"
                                   for r in rows))
        code = ("import sys; sys.path.insert(0, 'tools'); import expected_figures as t; from pathlib import Path; "
                f"t.expected.FOLDER = Path({str(out)!r}); "
                f"raise SystemExit(t.main(['quick-cpu', {str(results)!r}, *{list(extra)!r}]))")
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)

    assert tool(ROWS, "--machine", "box A").returncode == 0
    proc = tool([dict(r, ppl=r["ppl"] * 1.05) for r in ROWS], "--machine", "box B", "--also")
    assert proc.returncode == 0 and "box B added" in proc.stdout, proc.stderr
    doc = json.loads((out / "01_quantization_fundamentals.quick-cpu.json").read_text())
    assert doc["machine"] == "box A" and [a["machine"] for a in doc["also_measured_on"]] == ["box B"]
    assert doc["rows"][0]["also"][0]["ppl"] == pytest.approx(37.1 * 1.05)


def test_retiring_rows_keeps_every_machines_figures_of_the_rest(tmp_path, monkeypatch):
    """A variant moved to full mode leaves the quick file; the other CPUs' figures of the rows that stay survive, and
    only a run that reproduces its machine's figures of those rows may remove anything."""
    monkeypatch.setattr(expected, "FOLDER", tmp_path)
    run = [dict(r, model="m", lab="01") for r in ROWS]
    expected.write("01_quantization_fundamentals", "quick-cpu", run, model="m", machine="box A", measured="d",
                   command="c")
    on_b = [dict(r, ppl=r["ppl"] * 1.05) for r in run]
    expected.add_machine("01", "quick-cpu", on_b, model="m", machine="box B", measured="d")

    for bad, why in [
        (on_b[:2] + [dict(on_b[2], method="RTN clipped")], "lacks"),  # a row the file does not have
        (on_b, "nothing to retire"),  # every row still measured
        ([dict(on_b[0], ppl=on_b[0]["ppl"] * 1.03), on_b[1]], "moved figures"),  # the code changed a kept figure
        ([on_b[0], dict(on_b[1], weight_mb=on_b[1]["weight_mb"] + 1)], "moved figures"),
        ([dict(r, model="other") for r in on_b[:2]], "no rows of model"),
    ]:
        with pytest.raises(ValueError, match=why):
            expected.retire_rows("01", "quick-cpu", bad, model="m", machine="box B")
    with pytest.raises(ValueError, match="did not measure"):
        expected.retire_rows("01", "quick-cpu", on_b[:2], model="m", machine="box C")
    with pytest.raises(ValueError, match="moved figures"):  # box A's run holds box A's figures, not B's
        expected.retire_rows("01", "quick-cpu", on_b[:2], model="m", machine="box A")
    before = expected.load("01", "quick-cpu")

    out, gone = expected.retire_rows("01", "quick-cpu", on_b[:2], model="m", machine="box B")
    after = json.loads(out.read_text())
    assert gone == [("RTN", 3, 64)]
    assert after["rows"] == before["rows"][:2]  # both machines' figures of the rows that stay, untouched
    assert {k: v for k, v in after.items() if k != "rows"} == {k: v for k, v in before.items() if k != "rows"}
    assert expected.retire_rows("01", "quick-cpu", run[:1], model="m", machine="box A")[1] == [("RTN", 4, 64)]


def test_the_tool_retires_rows_and_refuses_it_with_also(tmp_path):
    results = tmp_path / "results.jsonl"
    out = tmp_path / "expected"
    out.mkdir()
    code = ("import sys; sys.path.insert(0, 'tools'); import expected_figures as t; from pathlib import Path; "
            f"t.expected.FOLDER = Path({str(out)!r}); raise SystemExit(t.main(sys.argv[1:]))")

    def tool(rows, *args):
        results.write_text("".join(json.dumps(dict(r, lab="01", model="smollm2-135m", quick=True)) + "\n"
                                   for r in rows))
        return subprocess.run([sys.executable, "-c", code, "quick-cpu", str(results), *args], cwd=ROOT,
                              capture_output=True, text=True)

    assert tool(ROWS, "--machine", "box A").returncode == 0
    proc = tool(ROWS[:2], "--machine", "box A", "--retire", "--also")
    assert proc.returncode != 0 and "do not go together" in proc.stderr
    proc = tool(ROWS[:2], "--machine", "box A", "--retire")
    assert proc.returncode == 0 and "removed 'RTN' (3-bit)" in proc.stdout, proc.stderr
    doc = json.loads((out / "01_quantization_fundamentals.quick-cpu.json").read_text())
    assert [r["bits"] for r in doc["rows"]] == [32, 4]


def test_this_cpu_names_the_processor():
    assert isinstance(expected.this_cpu(), str)
    if Path("/proc/cpuinfo").exists():
        assert expected.this_cpu()
