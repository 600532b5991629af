"""Measuring what compression costs and buys: perplexity, arithmetic and GSM8K accuracy, memory, speed.

    ppl = perplexity(model, tok, n_windows=16, seq_len=512)     # WikiText-2 test, deterministic
    acc = arithmetic_probe(model, tok, n=100)                   # few-shot 2-digit addition, exact match
    stored_bytes(model), peak_memory_bytes(), tokens_per_second(model, tok)

Used by every lab; the numbers feed compresslab.results.
"""

from __future__ import annotations

import math
import random
import time

import psutil
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import extract_number, gsm8k, test_windows


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------- perplexity


@torch.no_grad()
def perplexity(model, tokenizer, n_windows: int = 16, seq_len: int = 512, batch_size: int = 2,
               progress: bool = True) -> float:
    """exp(mean next-token NLL) over the first n_windows non-overlapping windows of WikiText-2 test."""
    windows = test_windows(tokenizer, n_windows, seq_len)  # (n_windows, seq_len)
    nll, count = 0.0, 0
    for i in tqdm(range(0, n_windows, batch_size), desc="perplexity", disable=not progress, leave=False):
        ids = windows[i : i + batch_size].to(_device(model))  # (b, seq_len)
        logits = model(ids).logits.float()  # (b, seq_len, vocab)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        nll, count = nll + loss.item(), count + ids[:, 1:].numel()
    return math.exp(nll / count)


# ----------------------------------------------------------------------------- generation helpers


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
                   desc: str = "generate", progress: bool = True, cache_factory=None,
                   align: int | None = None) -> list[str]:
    """Greedy completions of prompts, decoded without the prompt, in the order given.

    cache_factory: a callable returning a fresh KV cache per batch (lab 06's compressed caches); None: the default
    cache, with left-padded batches. A compressed cache groups tokens for its min/max, outliers and low-rank fit, and
    cannot see the attention mask: left padding would put pad tokens into a sequence's groups. So with a
    cache_factory every batch holds prompts of one token length only (no padding at all), up to batch_size each.

    align: keep only the last align * (n // align) tokens of each n-token prompt (cutting into its first worked
    example). A compressed cache whose fp16 buffer holds `align` tokens then compresses the *whole* prompt, question
    included, at prefill; otherwise the newest n % align tokens, the question among them, stay in full precision."""
    if align is not None and (isinstance(align, bool) or not isinstance(align, int) or align < 1):
        raise ValueError(f"align must be a positive int (the cache's residual_length, e.g. 64), got {align!r}")
    ids = tokenizer(list(prompts)).input_ids
    if align is not None:
        if any(len(x) < align for x in ids):
            raise ValueError(f"a prompt is shorter than align={align} tokens: use more shots (longer prompts)")
        ids = [x[len(x) % align:] for x in ids]
    if cache_factory is not None or align is not None:
        batches = unpadded_batches([len(x) for x in ids], batch_size)
    else:
        batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    outputs = [None] * len(prompts)
    for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
        enc = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(_device(model))
        cache = {} if cache_factory is None else {"past_key_values": cache_factory()}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, **cache)  # (b, prompt + new)
        for i, text in zip(idx, tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)):
            outputs[i] = text
    return outputs


def unpadded_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of equal token length (at most batch_size each), in first-seen order."""
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    return [group[j : j + batch_size] for group in by_length.values() for j in range(0, len(group), batch_size)]


# ----------------------------------------------------------------------------- the arithmetic probe


def arithmetic_prompts(n: int, digits: int = 2, shots: int = 3, seed: int = 0) -> list[tuple[str, str]]:
    """n seeded few-shot addition prompts -> [(prompt, answer)]. Each prompt shows `shots` solved examples."""
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1), 10**digits - 1

    def pair():
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        return f"Q: What is {a} + {b}?\nA:", str(a + b)

    items = []
    for _ in range(n):
        examples = [pair() for _ in range(shots)]
        question, answer = pair()
        prompt = "".join(f"{q} {a}\n\n" for q, a in examples) + question
        items.append((prompt, answer))
    return items


def arithmetic_probe(model, tokenizer, n: int = 100, digits: int = 2, shots: int = 3, seed: int = 0,
                     batch_size: int = 16, progress: bool = True, return_details: bool = False, cache_factory=None,
                     align: int | None = None):
    """Exact-match accuracy on few-shot `digits`-digit addition: a cheap numerical-fragility test.

    Quantization that leaves perplexity almost unchanged can still break exact arithmetic; this probe
    runs in seconds on a CPU and a 135M model scores well above zero. cache_factory / align: see generate_batch
    (align = the cache's residual_length puts the question itself into compressed blocks).
    """
    items = arithmetic_prompts(n, digits, shots, seed)
    completions = generate_batch(model, tokenizer, [p for p, _ in items], max_new_tokens=digits + 2,
                                 batch_size=batch_size, desc="arithmetic probe", progress=progress,
                                 cache_factory=cache_factory, align=align)
    preds = [extract_number(c.strip().split("\n")[0]) for c in completions]
    correct = [p == a for p, (_, a) in zip(preds, items)]
    acc = sum(correct) / max(len(items), 1)
    if return_details:
        return acc, [{"prompt": p, "answer": a, "completion": c, "correct": ok}
                     for (p, a), c, ok in zip(items, completions, correct)]
    return acc


# ----------------------------------------------------------------------------- noise: how sure is a difference?


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % (z = 1.96) Wilson score interval for an accuracy of correct / n: unlike p ± 2·sqrt(p(1-p)/n) it stays
    inside [0, 1] and is not zero-width at 0 % or 100 %. probe n = 16 at 50 % gives about 28 %–72 %."""
    counts = all(isinstance(v, int) and not isinstance(v, bool) for v in (correct, n))
    if not counts or n < 1 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n >= 1 (counts, not rates); got correct={correct!r}, n={n!r}")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_with_interval(acc: float, n: int) -> str:
    """'31% (22–41%)': an accuracy measured on n questions with its 95 % Wilson interval, for a printout."""
    lo, hi = wilson_interval(round(acc * n), n)
    return f"{acc:.0%} ({lo:.0%}–{hi:.0%})"


def paired_test(a: list[bool], b: list[bool]) -> dict:
    """Two models on the *same* questions: exact McNemar test on the discordant pairs (two-sided p-value).

    Only questions one model gets right and the other wrong carry information; p > 0.05 means the data do not
    show a difference. Returns {'a_only', 'b_only', 'p'}."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a and b must be per-question results of equal, non-zero length; got {len(a)} and {len(b)}")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    k, m = min(a_only, b_only), a_only + b_only
    p = 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2**m)
    return {"a_only": a_only, "b_only": b_only, "p": p}


# ----------------------------------------------------------------------------- GSM8K (GPU, >= 0.5B instruct)


def gsm8k_accuracy(model, tokenizer, n: int = 100, max_new_tokens: int = 256, batch_size: int = 8,
                   progress: bool = True, cache_factory=None) -> float:
    """Zero-shot chat GSM8K exact match on the first n test problems (the last number in the answer)."""
    problems = gsm8k("test")[:n]
    prompts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": p["question"] + "\nThink step by step, then end with 'The answer is N.'"}],
        tokenize=False, add_generation_prompt=True) for p in problems]
    completions = generate_batch(model, tokenizer, prompts, max_new_tokens, batch_size, "gsm8k", progress,
                                 cache_factory)
    correct = [extract_number(c) == p["final"] for c, p in zip(completions, problems)]
    return sum(correct) / max(len(problems), 1)


# ----------------------------------------------------------------------------- memory and speed


def stored_bytes(model) -> int:
    """Bytes of every parameter and buffer at the dtype it is stored in, tied tensors counted once (what the model
    occupies now; deploy.deployed_weight_bytes gives what a deployment format would store)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def peak_memory_bytes(device: str | None = None) -> int:
    """Peak GPU memory allocated (CUDA) or this process's resident memory (CPU)."""
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return psutil.Process().memory_info().rss


@torch.no_grad()
def tokens_per_second(model, tokenizer, prompt: str = "The history of data compression", new_tokens: int = 32,
                      batch_size: int = 1, repeats: int = 2) -> float:
    """Decode throughput of greedy generation (new tokens x batch / seconds), best of `repeats` after a warm-up."""
    enc = tokenizer([prompt] * batch_size, return_tensors="pt", padding=True).to(_device(model))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    model.generate(**enc, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(**enc, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return new_tokens * batch_size / best


def median_seconds(fn, repeats: int = 5, warmup: int = 1, setup=None) -> float:
    """Median wall time of fn() over `repeats` calls after `warmup` untimed ones, synchronising CUDA around each.

    setup: called untimed before each call, its result passed to fn — e.g. a fresh copy of a KV cache that fn
    extends: `median_seconds(lambda c: model(ids, past_key_values=c), setup=lambda: copy.deepcopy(cache))`."""
    times = []
    for _ in range(warmup + repeats):
        arg = setup() if setup is not None else None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(arg) if setup is not None else fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times[warmup:])[repeats // 2]


@torch.no_grad()
def prefill_seconds(model, tokenizer, seq_len: int = 512, batch_size: int = 1, repeats: int = 5) -> float:
    """Median seconds of one forward pass over batch_size x seq_len WikiText-2 tokens (after a warm-up): the
    prompt-processing latency, where a smaller dense model (structured pruning) pays off on any hardware."""
    ids = test_windows(tokenizer, batch_size, seq_len).to(_device(model))  # (b, seq_len)
    return median_seconds(lambda: model(ids, use_cache=False), repeats)


@torch.no_grad()
def matmul_seconds(W: torch.Tensor, x: torch.Tensor, repeats: int = 50) -> float:
    """Median seconds of x @ W.T (W dense, or torch's compressed 2:4 SparseSemiStructuredTensor)."""
    return median_seconds(lambda: F.linear(x, W), repeats, warmup=5)
