"""The offline workshop bundle (tools/offline_bundle.py, make offline-bundle): built, then run with no network.

check.py runs inside a network namespace with no interfaces (unshare -n), so any download attempt fails. The wheels
are not downloaded here (make offline-bundle does, and installs from them under the same namespace): the tests run
check.py with this interpreter against the bundle's data and model cache. Without unshare the tests skip, unless
COMPRESSLAB_REQUIRE_NETNS=1 (CI sets it).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("offline_bundle", ROOT / "tools" / "offline_bundle.py")
ob = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ob)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    if not ob.no_network_prefix():
        if os.environ.get("COMPRESSLAB_REQUIRE_NETNS") == "1":
            pytest.fail("unshare -rn is unavailable (and COMPRESSLAB_REQUIRE_NETNS=1)")
        pytest.skip("cannot create a network namespace here (unshare -rn): the offline run cannot be enforced")
    out = tmp_path_factory.mktemp("room") / "bundle"
    report = ob.build(out, wheels=False)
    return out, report


def test_bundle_holds_the_repo_data_model_and_scripts(bundle):
    out, report = bundle
    assert (out / "repo" / "labs" / "01_quantization_fundamentals.ipynb").is_file()
    assert (out / "repo" / "shared" / "compresslab" / "__init__.py").is_file() and report["files"] > 50
    for rel in ob.DATA_FILES:
        assert (out / "data" / rel).stat().st_size > 100_000, rel
    assert (out / "cache" / "models" / "smollm2-135m" / "model.safetensors").stat().st_size > 100e6
    assert not (out / "wheels").exists()
    install = (out / "install.sh").read_text()
    assert "PIP_NO_INDEX=1" in install and "PIP_CONFIG_FILE=/dev/null" in install and ob.TORCH_PIN in install
    assert "COMPRESSLAB_CACHE" in (out / "env.sh").read_text()


def test_bundle_runs_the_model_and_a_checker_with_no_network(bundle):
    out, _ = bundle
    line = ob.check(out, python=sys.executable)
    assert line.startswith("offline check passed") and "checkers work" in line, line


def test_the_no_network_run_really_has_no_network(bundle):
    """Inside the namespace not even loopback is up: a local TCP connection that works outside fails inside."""
    import subprocess

    probe = ("import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
             "socket.create_connection(s.getsockname(), timeout=3); print('connected')")
    outside = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    inside = subprocess.run(ob.no_network_prefix() + [sys.executable, "-c", probe], capture_output=True, text=True)
    assert outside.returncode == 0 and "connected" in outside.stdout, outside.stderr
    assert inside.returncode != 0 and "connected" not in inside.stdout, inside.stdout


@pytest.mark.parametrize("remove, message", [("data/gsm8k/test.jsonl", "does not exist"),
                                             ("cache/models/smollm2-135m", "no converted model")])
def test_check_fails_on_an_incomplete_bundle(bundle, tmp_path, remove, message):
    out, _ = bundle
    broken = tmp_path / "broken"
    shutil.copytree(out, broken, symlinks=True, copy_function=os.link, ignore=shutil.ignore_patterns("repo"))
    target = broken / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(SystemExit, match=message):
        ob.check(broken, python=sys.executable)


def test_requirements_are_every_pinned_dependency_and_extra():
    reqs = ob.requirements()
    assert all("==" in r for r in reqs), [r for r in reqs if "==" not in r]
    names = {r.split("==")[0] for r in reqs}
    assert {"transformers", "papermill", "triton", "onnxruntime", "jupyterlab"} <= names
    assert not any(n.startswith("torch") and n != "torchao" for n in names)  # torch comes pinned separately
