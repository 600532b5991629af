"""Test environment: offline, quick mode, the provided data, a throw-away results table."""

import os
import sys
import tempfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# the checker tests' shared helpers (tests/checker_testing.py): detailed assertion messages, as in test modules
pytest.register_assert_rewrite("checker_testing")


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("COMPRESSLAB_QUICK", "1")
    os.environ.pop("COMPRESSLAB_SIZES", None)  # a dry-run override (tools/check_full_mode.py) would change the figures
    # Triton decides at @triton.jit time whether a kernel is compiled or interpreted: without a GPU, every kernel a
    # test module defines (before or after importing compresslab.kernels) must run in the interpreter
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    data = ROOT.parent / "shared" / "data"  # provided beside the repo (CI sets the variable explicitly)
    if "COMPRESSLAB_DATA_DIR" not in os.environ and data.exists():
        os.environ["COMPRESSLAB_DATA_DIR"] = str(data)
    # never write into a participant's real results table
    os.environ["COMPRESSLAB_RESULTS"] = str(Path(tempfile.mkdtemp(prefix="compresslab-test-")) / "results.jsonl")


# modules whose subprocesses run against a clock (vLLM's start timeout, the browser's page loads, the bundle's and
# the import checks' subprocess timeouts): they run beside the notebooks at normal priority, before the rest
CLOCKED = ("test_serve.py", "test_slides.py", "test_offline_bundle.py", "test_nvmodelopt.py", "test_kernels_w4a16.py")
_YIELD_FROM: list[str] = []  # nodeid of the first test that runs at a lower priority than the notebooks


def pytest_collection_modifyitems(session, config, items):
    """The notebook runs (tests/test_notebooks.py) are most of the session: its starter test goes first, so the pool
    starts at once and every other test runs beside it; the tests that wait for the runs go last. Of the others, the
    CLOCKED modules go first; from the next test on, the main thread yields the cores to the notebooks
    (pytest_runtest_setup)."""
    starter = [i for i in items if i.name == "test_notebook_runs_start_before_the_other_tests"]
    if not starter:
        return
    waiting = [i for i in items if i.path == starter[0].path and i not in starter]
    rest = [i for i in items if i.path != starter[0].path]
    clocked = [i for i in rest if i.path.name in CLOCKED]
    others = [i for i in rest if i.path.name not in CLOCKED]
    items[:] = starter + clocked + others + waiting
    _YIELD_FROM[:] = [others[0].nodeid] if others and waiting else []


def pytest_runtest_setup(item):
    """With the notebook pool running, the session's main thread (the other tests, one torch thread) drops to nice 10
    for the rest of the session: with three runnable threads on two cores, equal shares slowed the two longest labs
    by half (lab 03: 9.2-10.1 min a run beside the tests, 6.0 alone), and the pool is the session's critical path.
    Measured effect, small: the tests still finish ~14 min in, lab 03 still took 9.1 min a run, and the session 33 min
    19 s against 33 min 35 s without it, inside the machine's run-to-run spread (~1.5 min). Linux only (per-thread
    nice); the pool's threads, created earlier, and the notebook kernels they start keep the normal priority."""
    if _YIELD_FROM and item.nodeid == _YIELD_FROM[0] and sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except OSError:
            pass


def pytest_terminal_summary(terminalreporter):
    """Each notebook run's wall time (tests/test_notebooks.py; two at a time, one torch thread each, the session's other
    tests beside the first ones): the quick-mode runtimes the README and the closing notes quote come from here."""
    import sys

    wall = next((m.WALL for name, m in list(sys.modules.items())
                 if name.rsplit(".", 1)[-1] == "test_notebooks" and getattr(m, "WALL", None)), None)
    if not wall:
        return
    terminalreporter.section("notebook wall times (quick mode; two runs at a time, one torch thread each, the other "
                             "tests beside the first ones)")
    for (stem, kind), seconds in sorted(wall.items()):
        terminalreporter.write_line(f"{stem:32s} {kind:9s} {seconds / 60:5.1f} min")


@pytest.fixture(scope="session")
def smollm():
    """The offline default model (float32, CPU) and its tokenizer, loaded once per session."""
    import compresslab as cl

    cl.setup(quick=True)
    return cl.load_model(device="cpu")


@pytest.fixture(scope="session")
def tiny_llama(smollm):
    """A 2-layer random Llama with SmolLM2's tokenizer: fast checks of the eval code paths."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = smollm
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(config).eval(), tok


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is fastest, and it avoids thread oversubscription on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_status():
    """The test starts and ends with an empty exercise table (checks.STATUS is a module-level dict)."""
    from compresslab import checks

    saved = dict(checks.STATUS)
    checks.STATUS.clear()
    yield
    checks.STATUS.clear()
    checks.STATUS.update(saved)
