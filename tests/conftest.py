"""Test environment: offline, quick mode, the provided data, a throw-away results table."""

import os
import tempfile
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


def pytest_collection_modifyitems(session, config, items):
    """The notebook runs (tests/test_notebooks.py) are most of the session: its starter test goes first, so the pool
    starts at once and every other test runs beside it; the tests that wait for the runs go last."""
    starter = [i for i in items if i.name == "test_notebook_runs_start_before_the_other_tests"]
    if not starter:
        return
    waiting = [i for i in items if i.path == starter[0].path and i not in starter]
    rest = [i for i in items if i.path != starter[0].path]
    items[:] = starter + rest + waiting


def pytest_terminal_summary(terminalreporter):
    """Each notebook run's wall time (tests/test_notebooks.py; two at a time, one torch thread each, the session's other
    tests beside the first ones): the quick-mode runtimes the README and the closing notes quote come from here. And
    every run that hung, was stopped and ran again, with where it hung (kernel stacks in its log)."""
    import sys

    module = next((m for name, m in list(sys.modules.items())
                   if name.rsplit(".", 1)[-1] == "test_notebooks" and getattr(m, "WALL", None) is not None), None)
    if module is None:
        return
    if module.WALL:
        terminalreporter.section("notebook wall times (quick mode; two runs at a time, one torch thread each, the "
                                 "other tests beside the first ones)")
        for (stem, kind), seconds in sorted(module.WALL.items()):
            terminalreporter.write_line(f"{stem:32s} {kind:9s} {seconds / 60:5.1f} min")
    if module.HUNG:
        terminalreporter.section("notebook runs that hung and were run again", yellow=True)
        for (stem, kind), where in sorted(module.HUNG.items()):
            terminalreporter.write_line(f"{stem} {kind}: {where}")


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
