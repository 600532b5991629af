"""The compressed KV cache inside transformers: a Cache whose layers (CompressedLayer) store the compressed form of
compresslab.kvcompress (the maths, and KVConfig), transformers' own QuantizedCache for comparison, and perplexity and
generation through a cache. (lab 06)

    cache = make_cache(model, KVConfig("gear"))                # a transformers Cache: generate(past_key_values=cache)
    cache_nbytes(cache)                                        # measured bytes of every stored tensor, by part
    kv_perplexity(model, tok, KVConfig("kivi", bits=2))        # prefill a prefix, score the rest against the cache
    q, k, v = layer_qkv(model, ids, layer=15)                  # what one attention layer really sees, after RoPE

The cache keeps the newest tokens in fp16 (a streaming buffer of `residual_length` tokens) and compresses them as one
block (KVConfig.compress) whenever the buffer fills; the tokens of the current forward pass always attend in full
precision. Blocks are compressed once and never re-quantized.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .kvcompress import GearCompressed, KVConfig, attention_dims, kv_bytes_per_token
from .kvformat import STORE, tensor_nbytes, validate_group

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # decoder-only, full attention, RoPE'd K/V per head

# ----------------------------------------------------------------------------- the cache


class CompressedLayer(DynamicLayer):
    """One decoder layer's cache: compressed blocks of past tokens + an fp16 buffer of the newest ones.

    `update` returns the reconstructed past, the buffer and the new states (these in full precision), like
    transformers' own QuantizedLayer; unlike it, a block is compressed once and never re-quantized."""

    is_croppable = False  # generate() checks this before cropping (assisted decoding, deferred stop checks)

    def __init__(self, config: KVConfig):
        super().__init__()
        self.config = config
        self.cumulative_length = 0
        self.key_blocks: list[GearCompressed] = []
        self.value_blocks: list[GearCompressed] = []

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        if self.config.method != "fp16":  # the fp16 cache groups nothing
            validate_group(d, self.config.group_size, "head_dim (values are grouped along channels)")
        self.keys = key_states.new_zeros((b, h, 0, d), dtype=STORE)  # the fp16 streaming buffer
        self.values = value_states.new_zeros((b, h, 0, d), dtype=STORE)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        dt = key_states.dtype
        past_k = [blk.reconstruct(dt) for blk in self.key_blocks] + [self.keys.to(dt)]
        past_v = [blk.reconstruct(dt) for blk in self.value_blocks] + [self.values.to(dt)]
        keys_out, values_out = torch.cat(past_k + [key_states], -2), torch.cat(past_v + [value_states], -2)

        self.keys = torch.cat([self.keys, key_states.to(STORE)], -2)
        self.values = torch.cat([self.values, value_states.to(STORE)], -2)
        R = self.config.residual_length
        n = (self.keys.shape[-2] // R) * R
        if self.config.method != "fp16" and n:
            first = not self.key_blocks
            self.key_blocks.append(self.config.compress(self.keys[..., :n, :].float(), "key", first))
            self.value_blocks.append(self.config.compress(self.values[..., :n, :].float(), "value", first))
            self.keys, self.values = self.keys[..., n:, :].clone(), self.values[..., n:, :].clone()
        return keys_out, values_out

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def nbytes(self) -> dict[str, int]:
        parts = {"fp16 buffer": tensor_nbytes(self.keys) + tensor_nbytes(self.values)} if self.is_initialized else {}
        for blk in self.key_blocks + self.value_blocks:
            for name, b in blk.nbytes().items():
                parts[name] = parts.get(name, 0) + b
        return parts

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.key_blocks, self.value_blocks = [], []

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("the compressed KV cache supports greedy and sampled generation only: beam search, "
                                  "cropping and batch reordering would need every block re-laid out. Use num_beams=1.")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _unsupported


def validate_model_supported(model) -> None:
    """The compressed cache assumes a decoder-only model with full attention in every layer and per-head K/V."""
    config = model.config.get_text_config(decoder=True)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"the compressed KV cache supports {SUPPORTED_MODEL_TYPES} models (decoder-only, full "
                         f"attention); got model_type={config.model_type!r}. Load one of the lab's models "
                         "(compresslab.load_model), or use transformers' own DynamicCache for this one.")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None and getattr(config, "use_sliding_window", False):
        layer_types = ["sliding_attention"]
    if layer_types is not None and set(layer_types) != {"full_attention"}:
        raise ValueError(f"the compressed KV cache needs full attention in every layer; this model has "
                         f"{sorted(set(layer_types))} (sliding-window layers keep a rolling cache).")


def make_cache(model, config: KVConfig | None = None) -> Cache:
    """A fresh cache for one generate() / forward: DynamicCache for config None, else a Cache of CompressedLayer."""
    if config is None:
        return DynamicCache(config=model.config)
    validate_model_supported(model)
    n_layers, _, head_dim = attention_dims(model.config)
    if config.method != "fp16":  # the fp16 cache groups nothing
        validate_group(head_dim, config.group_size, "head_dim (values are grouped along channels)")
    return Cache(layers=[CompressedLayer(config) for _ in range(n_layers)])


def cache_nbytes(cache: Cache) -> dict[str, int]:
    """Measured bytes of every stored tensor of a cache, by part (a DynamicCache counts as one 'dense' part)."""
    parts: dict[str, int] = {}
    for layer in cache.layers:
        if isinstance(layer, CompressedLayer):
            items = layer.nbytes().items()
        elif getattr(layer, "_quantized_keys", None) is not None:  # transformers' QuantizedLayer
            items = [("quantized (backend)", _deep_nbytes(layer._quantized_keys) + _deep_nbytes(layer._quantized_values)),
                     ("fp buffer", _deep_nbytes(layer.keys) + _deep_nbytes(layer.values))]
        else:
            items = [("dense", _deep_nbytes(layer.keys) + _deep_nbytes(layer.values))]
        for name, b in items:
            parts[name] = parts.get(name, 0) + b
    return parts


def _deep_nbytes(obj) -> int:
    """Bytes of a tensor, a tensor subclass made of inner tensors (optimum-quanto), or a tuple/dict of them."""
    if obj is None:
        return 0
    if isinstance(obj, (tuple, list)):
        return sum(_deep_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_deep_nbytes(o) for o in obj.values())
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(_deep_nbytes(getattr(obj, n)) for n in names)
        return tensor_nbytes(obj)
    return 0


def builtin_quantized_cache(model, bits: int = 4, group_size: int = 64, residual_length: int = 64,
                            axis_key: int = 0) -> Cache:
    """transformers' own QuantizedCache on the optimum-quanto backend (runs on CPU), for comparison.

    axis_key: transformers' default 0 gives keys a scale per token (groups along channels), the layout KIVI shows
    to be wrong for keys; -1 gives a scale per channel (groups along tokens), KIVI's. Either way the prompt is
    quantized at prefill with no fp16 residual (our cache keeps the newest partial block in fp16)."""
    from transformers.cache_utils import QuantizedCache

    if axis_key not in (0, -1):
        raise ValueError(f"axis_key must be 0 (transformers' default: per-token key scales) or -1 (per-channel, "
                         f"KIVI's layout); got {axis_key!r}")
    try:
        return QuantizedCache("quanto", model.config, nbits=bits, q_group_size=group_size,
                              residual_length=residual_length, axis_key=axis_key)
    except ImportError as err:
        raise ImportError(f"transformers' quantized cache needs optimum-quanto: pip install optimum-quanto ({err})")


# ----------------------------------------------------------------------------- evaluation through the cache


@torch.no_grad()
def kv_perplexity(model, tokenizer, config: KVConfig | None | str = None, n_windows: int = 4, prefix: int = 512,
                  scored: int = 512, chunk: int = 16, batch_size: int = 4, progress: bool = True) -> dict:
    """Perplexity that goes through the compressed cache: prefill `prefix` tokens of each WikiText-2 test window,
    then feed the next `scored` tokens `chunk` at a time (teacher forcing) and score each chunk's next-token
    predictions. Every scored token attends to the compressed past. Returns ppl and the measured cache bytes.

    config None: DynamicCache (the reference); "builtin-4"/"builtin-2": transformers' quanto QuantizedCache."""
    from .data import test_windows

    windows = test_windows(tokenizer, n_windows, prefix + scored + 1)  # (n, prefix + scored + 1)
    device = next(model.parameters()).device
    nll, count, parts, stored_tokens = 0.0, 0, {}, 0
    steps = [(i, s) for i in range(0, n_windows, batch_size) for s in range(prefix, prefix + scored, chunk)]
    bar = tqdm(total=len(steps), desc=f"kv perplexity ({cache_label(config)})", disable=not progress, leave=False)
    for i in range(0, n_windows, batch_size):
        ids = windows[i : i + batch_size].to(device)  # (b, prefix + scored + 1)
        cache = new_cache(model, config)
        model(ids[:, :prefix], past_key_values=cache, use_cache=True)
        for s in range(prefix, prefix + scored, chunk):
            e = min(s + chunk, prefix + scored)
            logits = model(ids[:, s:e], past_key_values=cache, use_cache=True).logits.float()  # (b, e - s, V)
            nll += F.cross_entropy(logits.flatten(0, 1), ids[:, s + 1 : e + 1].flatten(), reduction="sum").item()
            count += ids[:, s + 1 : e + 1].numel()
            bar.update()
        for name, b in cache_nbytes(cache).items():
            parts[name] = parts.get(name, 0) + b
        stored_tokens += ids.shape[0] * cache.get_seq_length()
    bar.close()
    fp16 = stored_tokens * kv_bytes_per_token(model.config, 2)
    total = sum(parts.values())
    return {"method": cache_label(config), "ppl": math.exp(nll / count), "kv_bytes": total, "fp16_bytes": fp16,
            "ratio": total / fp16, "parts": parts, "context": prefix + scored, "prefix": prefix, "chunk": chunk}


def cache_label(config) -> str:
    return "fp (DynamicCache)" if config is None else config if isinstance(config, str) else config.label


def new_cache(model, config):
    """A fresh cache for a KVConfig, None (DynamicCache) or 'builtin-<bits>' (transformers' quanto cache, its
    default per-token key scales) / 'builtin-<bits>-channel' (axis_key=-1: per-channel key scales, KIVI's layout)."""
    if isinstance(config, str):
        parts = config.split("-")
        if parts[0] != "builtin" or len(parts) not in (2, 3) or not parts[1].isdigit() or parts[2:] not in ([],
                                                                                                          ["channel"]):
            raise ValueError(f"config must be a KVConfig, None, 'builtin-<bits>' or 'builtin-<bits>-channel', "
                             f"got {config!r}")
        return builtin_quantized_cache(model, bits=int(parts[1]), axis_key=-1 if parts[2:] else 0)
    return make_cache(model, config)


@torch.no_grad()
def generate_with(model, tokenizer, prompt: str, config: KVConfig | None | str = None, max_new_tokens: int = 40) -> str:
    """Greedy completion of one prompt through a fresh (compressed) cache."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, past_key_values=new_cache(model, config),
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# ----------------------------------------------------------------------------- what a layout costs attention


@torch.no_grad()
def layer_qkv(model, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values one attention layer sees for ids (1, t), after RoPE, as its attention computes:
    q (1, heads, t, d), k and v (1, kv_heads, t, d), float32. (lab 06: judge a cache layout by the attention.)"""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    validate_model_supported(model)
    attn = model.model.layers[layer].self_attn
    seen = {}
    hook = attn.q_proj.register_forward_hook(lambda m, i, o: seen.setdefault("q", o.detach()))
    try:
        cache = model(ids, use_cache=True).past_key_values
    finally:
        hook.remove()
    b, t, _ = seen["q"].shape
    q = seen["q"].view(b, t, -1, attn.head_dim).transpose(1, 2)  # (b, heads, t, d), before RoPE
    if hasattr(attn, "q_norm"):  # Qwen3 normalises q per head before RoPE
        q = attn.q_norm(q)
    positions = torch.arange(t, device=ids.device)[None]  # (1, t)
    cos, sin = model.model.rotary_emb(q, positions)
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    k, v = cache.layers[layer].keys, cache.layers[layer].values  # (b, kv_heads, t, d), RoPE already applied
    return q.float(), k.float(), v.float()
