"""Run every lab and solution notebook end to end on CPU, and read the checkers' verdicts.

* the lab notebook (unsolved), exactly as committed, runs under nbval (`pytest --nbval-lax`) as a participant's kernel
  runs it: no parameter injected, its own defaults (QUICK = None: automatic, so quick on a CPU), in a folder of its own
  beside the notebooks it reuses artifacts from, as `labs/` is for a participant. It must run green and report every
  exercise NOT DONE (read from the exercise log the checkers append to, COMPRESSLAB_EXERCISE_LOG);
* the solution notebook runs under papermill with parameters injected (QUICK = True, every *_DIR into a temporary
  folder, and USES: a later lab pointed at an earlier lab's export) and must pass every checker;
* both record the same metrics in the results table (the lab falls back to the reference implementations, and
  runs are seeded), which is also the determinism check: two CPU runs, two runners, the same numbers.

The 2 x N notebook runs are the bulk of `make test`. They run as separate processes, two at a time with one torch
thread each (COMPRESSLAB_NOTEBOOK_WORKERS overrides): a notebook spends much of its time in single-threaded Python and
small matmuls, so two one-thread kernels use a 2-core machine better than one two-thread kernel. The slowest notebooks
start first, and they start before every other test of the session (conftest moves this module's first test to the
front and the rest to the end): the other tests, mostly single-threaded, run beside the notebooks with one torch
thread instead of after them, which saves about 2.5 min of the 36 a serial session took on 2 cores. Each run gets
the environment of the session's start, not whatever a test has monkeypatched since.

A run that passes RUN_LIMIT_S has hung (quick-mode runs take 1-10 min): its processes' Python stacks are read
(py-spy), every process of the run is stopped, and it runs once more in a clean folder; a second hang fails its tests
with the stacks. The session's summary lists every such run and where it hung. (One CI run's papermill copy of lab 01
stayed in its widget cell from minute 24 of the session until CI's 90 minutes ran out, and said nothing: nbclient's
Output-widget stand-in, which tools/papermill_run.py now leaves out.) A run's output goes to a file, not a pipe, so no
process a kernel leaves behind can keep the run from ending.
"""

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import nbformat
import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parents[1]
WALL: dict[tuple[str, str], float] = {}  # (stem, "lab" | "solution") -> seconds of that notebook run
HUNG: dict[tuple[str, str], str] = {}  # (stem, kind) -> where its first try hung (it ran again); conftest prints these
# a run this long has hung: quick-mode runs take 1-10 min on 2 cores with the other tests beside them (seconds)
RUN_LIMIT_S = float(os.environ.get("COMPRESSLAB_NOTEBOOK_RUN_LIMIT", 20 * 60))
BASE_ENV: dict[str, str] = {}  # os.environ when the runs started: tests running beside them monkeypatch the live one
SOURCES = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.py"))
# quick-mode minutes per run on a 2-core CPU (measured), to start the longest first; unknown notebooks go first
MINUTES = {"01": 2.7, "02": 4.3, "03": 6.0, "04": 2.7, "05": 3.2, "06": 1.0, "07": 2.3, "08": 2.7}
# Later labs reuse earlier labs' artifacts, as a participant's would (USES: lab 08 loads the checkpoint lab 02's
# solution run exported instead of re-quantizing); tools/check_full_mode.py runs full mode the same way and is the
# one place these facts, and how a notebook's printed output is read, live.
_spec = importlib.util.spec_from_file_location("check_full_mode", ROOT / "tools" / "check_full_mode.py")
_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tool)
USES, _outputs_text = _tool.USES, _tool.outputs_text


def _exercises(source: Path) -> list[str]:
    """Names of the checkers a lab calls, in order (cl.checks.check_xxx)."""
    return re.findall(r"cl\.checks\.(check_\w+)\(", source.read_text())


def _param_dir(out_dir: Path, name: str) -> Path:
    return out_dir / name.lower()


class RunHung(RuntimeError):
    """A notebook run passed RUN_LIMIT_S; its processes were stopped after their stacks were read."""


def _execute(source: Path, kind: str, out_dir: Path, threads: int, reuse: dict | None = None,
             after: Future | None = None) -> dict:
    if after is not None:
        after.result()  # the run whose artifacts this one reuses (raises if it failed)
    run = _nbval if kind == "lab" else _papermill
    start = time.perf_counter()
    try:
        result = run(source, out_dir, threads, reuse)
    except RunHung as hung:  # once: a second hang raises, and the tests that read this run fail with the stacks
        HUNG[(source.stem, kind)] = str(hung)
        for path in out_dir.iterdir():  # a clean folder (the results table appends), the first try's log kept
            if path.name != "hung-run.log":
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        start = time.perf_counter()
        result = run(source, out_dir, threads, reuse)
    WALL[(source.stem, kind)] = time.perf_counter() - start  # conftest prints these after the session
    return result


def _env(out_dir: Path, threads: int) -> dict:
    return (BASE_ENV or dict(os.environ)) | {"COMPRESSLAB_RESULTS": str(out_dir / "results.jsonl"),
                         "COMPRESSLAB_EXERCISE_LOG": str(out_dir / "exercises.jsonl"),
                         "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]


def _run(cmd: list[str], cwd: Path, env: dict, log: Path, where) -> int:
    """cmd's exit status, its output in log. Past RUN_LIMIT_S: the Python stacks of every process of the run, then
    SIGKILL to all of them (a kernel is its own session: it is found as a descendant), and RunHung with where()."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=RUN_LIMIT_S)
        except subprocess.TimeoutExpired:
            stacks = _stop(proc.pid)
            proc.wait()
    shutil.copy(log, log.with_name("hung-run.log"))
    raise RunHung(f"no end after {RUN_LIMIT_S:.0f} s, {where()}; log: {log}; stacks:\n{stacks}")


def _stop(pid: int) -> str:
    """Stop a process and its descendants; first, the Python stacks of each (py-spy, if it may attach)."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return "(the run had ended)"
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    stacks = []
    for p in tree:
        try:
            head = f"--- pid {p.pid}: {' '.join(p.cmdline())[:160]}".replace("\n", " ")
        except psutil.Error:
            continue
        if spy:
            try:
                dump = subprocess.run([spy, "dump", "--pid", str(p.pid)], capture_output=True, text=True, timeout=60)
                stacks.append(f"{head}\n{(dump.stdout or dump.stderr).strip()[-6000:]}")
            except subprocess.TimeoutExpired:
                stacks.append(f"{head}\n(py-spy did not answer in 60 s)")
        else:
            stacks.append(f"{head}\n(no py-spy here: pip install py-spy to see the stacks)")
    for p in tree:
        try:
            p.kill()  # SIGKILL
        except psutil.Error:
            pass
    psutil.wait_procs(tree, timeout=30)
    return "\n".join(stacks)


def _papermill(source: Path, out_dir: Path, threads: int, reuse: dict | None) -> dict:
    path = ROOT / "solutions" / f"{source.stem}.ipynb"
    # every *_DIR parameter (where a lab writes artifacts) points into the temporary folder, not the repo
    params = {"QUICK": True} | {p: str(_param_dir(out_dir, p)) for p in pm.inspect_notebook(str(path))
                                 if p.endswith("_DIR")} | (reuse or {})
    out = out_dir / "executed.ipynb"
    log = out_dir / "papermill.log"
    # papermill without nbclient's Output-widget stand-in, which now and then waits for ever (tools/papermill_run.py)
    code = _run([sys.executable, str(ROOT / "tools" / "papermill_run.py"), str(path), str(out), "-y",
                 json.dumps(params), "--cwd", str(ROOT / "solutions"), "--no-progress-bar", "-k", "python3"],
                ROOT, _env(out_dir, threads), log, lambda: _running_cell(out))
    if code != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"solutions/{path.name} failed (executed copy: {out}):\n{tail}")
    return {"text": _outputs_text(nbformat.read(out, as_version=4)), "rows": _rows(out_dir)}


def _running_cell(executed: Path) -> str:
    """Which cell papermill's executed copy (saved as each cell starts) says is running."""
    try:
        cells = nbformat.read(executed, as_version=4).cells
    except Exception:  # noqa: BLE001 - not written yet, or mid-write
        return "before its first cell"
    for i, cell in enumerate(cells):
        meta = cell.metadata.get("papermill", {})
        if meta.get("status") == "running":
            return f"in cell {i} (started {meta.get('start_time')}): {cell.source.strip().splitlines()[0][:100]!r}"
    return "with no cell running (starting or stopping its kernel)"


def _nbval(source: Path, out_dir: Path, threads: int, reuse: dict | None) -> dict:
    """The committed lab notebook under nbval, in out_dir/labs/ (nbval's kernel runs in the notebook's folder), with
    the artifacts of the lab it reuses linked in under the names its defaults expect."""
    folder = out_dir / "labs"
    folder.mkdir()
    notebook = shutil.copy(ROOT / "labs" / f"{source.stem}.ipynb", folder)
    if reuse:
        for name, path in reuse.items():  # e.g. lab 08's GPTQ_DIR default "gptq-export" -> lab 02's export
            default = _defaults(source)[name]
            (folder / default).symlink_to(path, target_is_directory=True)
    env = _env(out_dir, threads)
    if _cpu_only():  # the automatic mode is what this run proves; a GPU box would pick full mode, so force quick
        env.pop("COMPRESSLAB_QUICK", None)
    log = out_dir / "nbval.log"
    code = _run([sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-cell-timeout=1800", "-v",
                 "-p", "no:cacheprovider", "--rootdir", str(folder), str(notebook)], folder, env, log,
                lambda: _last_cell_line(log))
    output = log.read_text(errors="replace")
    if code != 0:
        raise RuntimeError(f"labs/{source.stem}.ipynb failed under nbval (folder {folder}):\n{output[-5000:]}")
    exercises = [json.loads(line) for line in (out_dir / "exercises.jsonl").read_text().splitlines()]
    return {"exercises": exercises, "rows": _rows(out_dir)}


def _last_cell_line(log: Path) -> str:
    """nbval -v reports each cell as it ends: the run hung in the cell after the last one reported."""
    lines = re.findall(r"::Cell \d+ \w+", log.read_text(errors="replace"))
    return f"after {lines[-1].lstrip(':')}" if lines else "before its first cell ended"


def _defaults(source: Path) -> dict[str, str]:
    """The lab notebook's parameter defaults (its *_DIR names)."""
    found = pm.inspect_notebook(str(ROOT / "labs" / f"{source.stem}.ipynb"))
    return {name: ast.literal_eval(p["default"]) for name, p in found.items() if name.endswith("_DIR")}


def _cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


@pytest.fixture(scope="session")
def runs(request, tmp_path_factory) -> dict[tuple[str, str], Future]:
    """Start every selected notebook's runs at once (a pool of workers); each test waits for the runs it reads."""
    import compresslab as cl

    selected = {item.callspec.params["source"] for item in request.session.items
                if item.path == Path(__file__) and "source" in getattr(getattr(item, "callspec", None), "params", {})}
    by_number = {s.stem[:2]: s for s in SOURCES}
    selected |= {by_number[USES[s.stem[:2]][0]] for s in selected if s.stem[:2] in USES}

    cl.models.default_model_dir()  # convert the offline model once, before several kernels want it
    BASE_ENV.clear()
    BASE_ENV.update(os.environ)
    import torch

    main_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tests that run beside the notebooks: the cores are the notebooks'
    workers = int(os.environ.get("COMPRESSLAB_NOTEBOOK_WORKERS", min(2, os.cpu_count() or 1)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ThreadPoolExecutor(max_workers=workers)
    futures, out_dirs = {}, {}
    # a lab that reuses another's artifacts starts after every lab it does not depend on: its wait blocks no worker
    for source in sorted(selected, key=lambda s: (s.stem[:2] in USES, -MINUTES.get(s.stem[:2], 99))):
        for kind in ("solution", "lab"):
            reuse, after = None, None
            if source.stem[:2] in USES:  # the solution reuses the dependency's solution run, the lab its lab run
                dep, names = USES[source.stem[:2]]
                dep_stem = by_number[dep].stem
                dep_dir = out_dirs[dep_stem][kind]
                where = ((lambda q: _param_dir(dep_dir, q)) if kind == "solution"
                         else (lambda q: dep_dir / "labs" / _defaults(by_number[dep])[q]))
                reuse = {p: str(where(q)) for p, q in names.items()}
                after = futures[(dep_stem, kind)]
            out_dir = out_dirs.setdefault(source.stem, {})[kind] = tmp_path_factory.mktemp(f"{source.stem}-{kind}")
            futures[(source.stem, kind)] = pool.submit(_execute, source, kind, out_dir, threads, reuse, after)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)
    torch.set_num_threads(main_threads)


def test_notebook_runs_start_before_the_other_tests(runs):
    """conftest runs this test first: it starts the pool (the `runs` fixture) and returns, so the session's other tests
    run beside the notebooks; this module's remaining tests run last and wait for the runs they read."""
    assert all(isinstance(f, Future) for f in runs.values())


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_solution_passes_every_checker(source, runs):
    text = runs[(source.stem, "solution")].result()["text"]
    n = len(_exercises(source))
    assert n >= 3
    assert text.count(": PASSED") == n, text[-3000:]
    assert "FAILED" not in text and "NOT DONE" not in text
    assert f"{n}/{n} exercises passed" in text


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_lab_runs_green_with_every_exercise_not_done(source, runs):
    """nbval ran every cell of the committed notebook without an error; each checker said NOT DONE, once."""
    log = runs[(source.stem, "lab")].result()["exercises"]
    n = len(_exercises(source))
    assert len(log) == n and {e["status"] for e in log} == {"not done"}, log
    assert len({e["exercise"] for e in log}) == n, log


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_lab_and_solution_measure_the_same_numbers(source, runs):
    solution = runs[(source.stem, "solution")].result()["rows"]
    lab = runs[(source.stem, "lab")].result()["rows"]
    assert solution, "the notebook recorded no results"
    metrics = ("method", "bits", "group_size", "ppl", "probe_acc", "weight_mb")
    assert [[r[k] for k in metrics] for r in lab] == [[r[k] for k in metrics] for r in solution]


@pytest.mark.parametrize("source", [s for s in SOURCES if not s.stem.endswith("_kv_cache")], ids=lambda p: p.stem)
def test_every_row_describes_the_model_it_measured(source, runs):
    """Issue 24, item 6: every weight row carries the bits and weight MB of the model it measured (lab 06's rows
    describe KV caches, not weights). Lab 02's quantized rows are smaller than its fp32 row; lab 04's structured
    rows are smaller dense models (no zeros) with their removed parameters in their own column."""
    rows = runs[(source.stem, "solution")].result()["rows"]
    for r in rows:
        assert r["bits"] is not None and r["weight_mb"] is not None and r["weight_mb"] > 0, r
    lab = source.stem[:2]
    if lab == "02":
        dense = next(r for r in rows if r["method"] == "fp32")
        assert dense["bits"] == 32
        for r in rows:
            if r["bits"] < 16:
                assert r["weight_mb"] < dense["weight_mb"] / 3 and r["group_size"], r
    if source.stem.endswith("_pruning"):
        dense = next(r for r in rows if r["method"] == "dense")
        structured = [r for r in rows if r["method"].startswith("structured")]
        assert structured and all(r["sparsity"] == 0 and 0 < r["params_removed"] < 1
                                  and r["weight_mb"] < dense["weight_mb"] for r in structured)
        assert all(r["bits"] == 4 and r["weight_mb"] < dense["weight_mb"] / 4 for r in rows if "+ 4-bit" in r["method"])


@pytest.mark.parametrize("source", [s for s in SOURCES if s.stem.endswith("_pruning")], ids=lambda p: p.stem)
def test_pruning_lab_compares_wanda_and_sparsegpt_on_held_out_tokens(source, runs):
    """Issue 24, item 8: SparseGPT was scored on the tokens it was fitted on. Both methods now fit on one half of
    the windows and are scored on the other; SparseGPT's error on its own tokens is lower than on held-out ones."""
    text = runs[(source.stem, "solution")].result()["text"]
    found = re.findall(r"fit tokens: Wanda ([\d.]+) \| SparseGPT ([\d.]+);\s+held-out: Wanda ([\d.]+) \| "
                       r"SparseGPT ([\d.]+)", text)
    assert len(found) == 2, text[-2000:]
    for _, sgpt_fit, _, sgpt_held in found:
        assert float(sgpt_fit) < float(sgpt_held)


@pytest.mark.parametrize("source", [s for s in SOURCES if s.stem.endswith("_deployment")], ids=lambda p: p.stem)
def test_deployment_lab_serves_both_checkpoints_with_vllm(source, runs):
    """Issue 25: the deployment lab's vLLM section runs in quick mode (CI installs .venv-serve): the bf16 and W4A16
    sweeps are measured, the engine's KV capacity matches the lab's formula, and vLLM's greedy tokens on the W4A16
    compressed-tensors checkpoint equal transformers' on the same folder."""
    if not os.environ.get("COMPRESSLAB_REQUIRE_SERVE") and not (ROOT / ".venv-serve" / "bin" / "python").exists():
        pytest.skip("no .venv-serve here (make serve-env): the deployment lab skipped its vLLM section")
    run = runs[(source.stem, "solution")].result()
    text = run["text"]
    assert "-> the same W4A16 checkpoint: True" in text, text[-3000:]
    assert re.search(r"engine:\s+[\d,]+ tokens.*-> the same", text)
    methods = {r["method"] for r in run["rows"]}
    assert {"vLLM bf16, concurrency 1", "vLLM W4A16, concurrency 4"} <= methods


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_solution_figures_match_the_quick_cpu_reference(source, runs):
    """Issue 26, item 2: each lab's quick-CPU figures are committed (compresslab/expected, written by
    tools/expected_figures.py from runs like this one); this run reproduces every row within the file's noise bands,
    and has no row the file lacks. The lab's last cell shows a participant the same comparison."""
    from compresslab import expected

    reference = expected.load(source.stem[:2], "quick-cpu")
    assert reference, (f"no quick-cpu reference for {source.stem}: run tests/test_notebooks.py, then "
                       "tools/expected_figures.py quick-cpu on its solution results (see the tool's docstring)")
    run = runs[(source.stem, "solution")].result()
    rows = [r for r in run["rows"] if r["model"] == reference["model"] and r["quick"]]
    problems = expected.differences(rows, reference)
    assert problems == [], (f"on {expected.this_cpu() or 'an unnamed CPU'} (reference: {expected.machines(reference)})"
                            f": {problems}; if only calibrated rows moved and this is a CPU the file lacks, add this "
                            "run with tools/expected_figures.py --also")
    # and the lab's own last cell, which reads the results table, says so to the participant
    assert "every figure within its band" in run["text"], run["text"][-3000:]


def test_a_hung_run_is_stopped_with_its_stacks(tmp_path, monkeypatch):
    """A run past RUN_LIMIT_S: RunHung names where it was and carries each process's Python stack (py-spy), and every
    process of the run is gone, a grandchild in a session of its own (as a kernel is) included."""
    import psutil

    monkeypatch.setattr(sys.modules[__name__], "RUN_LIMIT_S", 3.0)
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time\n"
              "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
              f"open({str(pid_file)!r}, 'w').write(str(g.pid))\n"
              "def wait_forever():\n    time.sleep(600)\n"
              "wait_forever()\n")
    with pytest.raises(RunHung) as hung:
        _run([sys.executable, "-c", script], tmp_path, dict(os.environ), tmp_path / "run.log", lambda: "in the test")
    message = str(hung.value)
    assert "no end after 3 s, in the test" in message and (tmp_path / "hung-run.log").exists()
    if shutil.which("py-spy", path=str(Path(sys.executable).parent)):
        assert "wait_forever" in message, message  # the hung process's own frame
    grandchild = int(pid_file.read_text())
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE


def test_a_run_that_hangs_once_runs_again_in_a_clean_folder(tmp_path, monkeypatch):
    """The first try hangs (after writing a results row); the second runs in a folder with only the first try's log,
    its result is the run's, and HUNG says where the first one hung. A second hang propagates."""
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "HUNG", {})
    monkeypatch.setattr(module, "WALL", {})
    tries = []

    def flaky(source, out_dir, threads, reuse):
        tries.append(sorted(p.name for p in out_dir.iterdir()))
        if len(tries) == 1:
            (out_dir / "results.jsonl").write_text('{"method": "half"}\n')
            (out_dir / "hung-run.log").write_text("first try")
            (out_dir / "export").mkdir()
            raise RunHung("no end after 1500 s, in cell 59")
        return {"rows": "second try"}

    monkeypatch.setattr(module, "_papermill", flaky)
    source = SOURCES[0]
    assert _execute(source, "solution", tmp_path, 1) == {"rows": "second try"}
    assert tries == [[], ["hung-run.log"]]
    assert module.HUNG == {(source.stem, "solution"): "no end after 1500 s, in cell 59"}
    assert (source.stem, "solution") in module.WALL

    def always(source, out_dir, threads, reuse):
        raise RunHung("again")

    monkeypatch.setattr(module, "_papermill", always)
    with pytest.raises(RunHung, match="again"):
        _execute(source, "solution", tmp_path, 1)
