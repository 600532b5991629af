"""The data sets the labs measure on: WikiText-2 (perplexity, calibration) and GSM8K (reasoning).

    text = wikitext2("test")                                # one string, rows joined by blank lines
    calib = calibration_batches(tok, n_samples=16, seq_len=256, seed=0)   # (16, 256) token ids
    problems = gsm8k("test")                                # [{"question", "answer", "final"}, ...]

With COMPRESSLAB_DATA_DIR set (CI and offline workshops), files are read from that folder:
    wikitext-2/test.raw.txt, wikitext-2/valid.tokens.txt, gsm8k/{train,test}.jsonl
Otherwise the same data sets come from the Hugging Face hub through `datasets`. Used by every lab.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path

import torch

DATA_ENV = "COMPRESSLAB_DATA_DIR"


def _local(relpath: str) -> Path | None:
    root = os.environ.get(DATA_ENV)
    if not root:
        return None
    path = Path(root) / relpath
    if not path.exists():
        raise FileNotFoundError(f"{DATA_ENV}={root} is set but {path} does not exist. "
                                f"Point {DATA_ENV} at a folder with {relpath}, or unset it to use the hub.")
    return path


def _hub(*args, **kwargs):
    try:
        from datasets import load_dataset

        return load_dataset(*args, **kwargs)
    except Exception as err:
        raise RuntimeError(f"Could not load {args} from the hub ({err}). Offline? Set {DATA_ENV} to a folder "
                           "holding the data files (see README: 'Offline data').") from err


@lru_cache(maxsize=4)
def wikitext2(split: str = "test") -> str:
    """WikiText-2 as one string: 'test' is the raw test split (perplexity), 'valid' the validation split
    (calibration; the tokenized version with <unk>, as GPTQ/Wanda calibrate on)."""
    if split not in ("test", "valid"):
        raise ValueError(f"split must be 'test' or 'valid', got {split!r}")
    name = "test.raw.txt" if split == "test" else "valid.tokens.txt"
    path = _local(f"wikitext-2/{name}")
    if path is not None:
        return path.read_text(encoding="utf-8")
    config = "wikitext-2-raw-v1" if split == "test" else "wikitext-2-v1"
    rows = _hub("Salesforce/wikitext", config, split="test" if split == "test" else "validation")["text"]
    return "\n\n".join(rows)


def gsm8k_text(split: str = "train") -> str:
    """GSM8K problems with their worked solutions as one text: math-flavoured calibration data (lab 02)."""
    return "\n\n".join(f"Question: {p['question']}\nAnswer: {p['answer']}" for p in gsm8k(split))


@lru_cache(maxsize=8)
def _token_ids(tokenizer, split: str) -> torch.Tensor:
    """(n_tokens,) ids of a whole split ('test', 'valid' or 'gsm8k'); cached per tokenizer (tokenizing takes seconds)."""
    text = gsm8k_text("train") if split == "gsm8k" else wikitext2(split)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]


def test_windows(tokenizer, n_windows: int, seq_len: int) -> torch.Tensor:
    """(n_windows, seq_len) non-overlapping windows from the start of WikiText-2 test (deterministic)."""
    ids = _token_ids(tokenizer, "test")
    available = ids.numel() // seq_len
    if n_windows > available:
        raise ValueError(f"WikiText-2 test has {available} windows of {seq_len} tokens; asked for {n_windows}")
    return ids[: n_windows * seq_len].view(n_windows, seq_len)


def calibration_batches(tokenizer, n_samples: int = 128, seq_len: int = 512, seed: int = 0,
                        source: str = "wikitext") -> torch.Tensor:
    """(n_samples, seq_len) random windows of WikiText-2 valid (or GSM8K train: source='gsm8k'), seeded."""
    if source not in ("wikitext", "gsm8k"):
        raise ValueError(f"source must be 'wikitext' or 'gsm8k', got {source!r}")
    ids = _token_ids(tokenizer, "valid" if source == "wikitext" else "gsm8k")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def _final_answer(answer: str) -> str:
    """GSM8K answers end with '#### 42'; return '42' (commas removed)."""
    return answer.split("####")[-1].strip().replace(",", "")


def gsm8k(split: str = "test") -> list[dict]:
    """GSM8K problems: [{'question', 'answer' (worked solution), 'final' (the number as a string)}]."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = _local(f"gsm8k/{split}.jsonl")
    if path is not None:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        rows = [dict(r) for r in _hub("openai/gsm8k", "main", split=split)]
    return [{"question": r["question"], "answer": r["answer"], "final": _final_answer(r["answer"])} for r in rows]


def extract_number(text: str) -> str | None:
    """The last number in a model's answer ('... so she has 1,234 apples.' -> '1234'), or None."""
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "").rstrip(".")
    return value[:-2] if value.endswith(".0") else value


def training_windows(tokenizer, n_windows: int, seq_len: int = 256, seed: int = 0) -> torch.Tensor:
    """(n_windows, seq_len) non-overlapping windows of WikiText-2 valid in a seeded random order: training text for
    fine-tuning and distillation (lab 05). '<unk>' markers are removed first, so a model trained on them does not learn
    to predict a token that the raw test split never contains. Disjoint from the test split used for perplexity."""
    ids = _unk_free_ids(tokenizer)
    available = ids.numel() // seq_len
    if not 1 <= n_windows <= available:
        raise ValueError(f"WikiText-2 valid has {available} windows of {seq_len} tokens; asked for {n_windows}")
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n_windows]
    return ids[: available * seq_len].view(available, seq_len)[order]


@lru_cache(maxsize=4)
def _unk_free_ids(tokenizer) -> torch.Tensor:
    text = wikitext2("valid").replace(" <unk>", "").replace("<unk>", "")
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
