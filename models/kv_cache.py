"""The one KV cache of our decoding loops (lookup-aware generation, constrained annotation).

A transformers ``DynamicCache``, optionally with layers that append into spare capacity, plus what the
loops need beyond the library: the keyword a model takes the cache by, and keeping chosen positions
per row (dropping the masked holes rejected drafts leave). Layout of each layer's keys and values:
(batch, kv heads, positions, head dim).
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch


def cache_keyword(module) -> str:
    """The keyword ``module.forward`` takes the cache by: ``cache`` in newer transformers, else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def new_cache(config, *, growing: bool = False):
    """An empty cache for a model of ``config``. ``growing``: layers append into spare capacity (doubling)
    instead of concatenating the whole cache on every forward pass, as ``DynamicLayer`` does; worth it
    when many short forward passes follow one another (chunked decoding)."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=config)
    except TypeError:  # older transformers
        return DynamicCache()
    if growing:
        from transformers.cache_utils import DynamicLayer

        if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
            cache.layers = [_growing_layer()() for _ in cache.layers]
    return cache


@contextlib.contextmanager
def cpu_bf16_attention(model, amp: torch.dtype | None = None):
    """Eager attention (softmax(QKᵀ)V) in the transformers models within ``model`` where it is the faster kernel: on
    the CPU under bfloat16 (``amp``, or else the autocast in force on entry). There PyTorch's SDPA with a padding mask
    took 1.4x the whole sampling loop's time of the eager softmax(QKᵀ)V (256 rows x 32 tokens of the 4.2M LM, 2
    threads), and its flash kernel's backward made a STAR-LDM training step 1.2x slower (32 rows x ~90 positions,
    fwd + bwd of one attention: 22 ms flash, 5.4 ms eager). In float32 and on GPUs SDPA is kept."""
    if amp is None and torch.is_autocast_enabled("cpu"):
        amp = torch.get_autocast_dtype("cpu")
    switch = []
    if amp == torch.bfloat16 and next(model.parameters()).device.type == "cpu":
        configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values()
        switch = [c for c in configs if getattr(c, "_attn_implementation", None) == "sdpa"]
    for config in switch:
        config._attn_implementation = "eager"
    try:
        yield
    finally:
        for config in switch:
            config._attn_implementation = "sdpa"


class PrefixSlots:
    """Per-layer keys/values of a fixed prefix in buffers with room for ``room`` positions after it. Every
    :meth:`cache` is a fresh cache over those buffers whose forward pass writes its own positions into the room,
    overwriting the previous pass's, where ``DynamicLayer`` would copy the whole prefix (twice: once when the prefix
    is put in, once when the pass appends). For many passes of the same few positions after one prefix: a thought's
    denoising steps over its soft tokens (there the copies were a fifth of a step's time on a CPU)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], room: int):
        self.length, self.room = layers[0][0].shape[-2], room
        self.buffers = []
        for key, value in layers:
            pair = []
            for t in (key, value):
                buffer = t.new_empty((*t.shape[:-2], self.length + room, t.shape[-1]))
                buffer[..., :self.length, :] = t
                pair.append(buffer)
            self.buffers.append(tuple(pair))

    def cache(self, config):
        """A cache holding the prefix, ready for one forward pass of at most ``room`` positions."""
        cache = new_cache(config)
        layers = getattr(cache, "layers", None)
        if not layers or len(layers) != len(self.buffers):  # older transformers: the concatenating cache
            for i, (key, value) in enumerate(self.buffers):
                cache.update(key[..., :self.length, :], value[..., :self.length, :], i)
            return cache
        slot = _slot_layer()
        cache.layers = [slot(key, value, self.length) for key, value in self.buffers]
        return cache


def keep_positions(cache, index: torch.Tensor) -> None:
    """Keep, for each batch row, the cache positions ``index`` (batch, width) in that order."""
    gather = index[:, None, :, None]
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name)
            setattr(layer, name, t.gather(2, gather.expand(-1, t.shape[1], -1, t.shape[3])))


@functools.cache
def _growing_layer():
    """A KV-cache layer that appends into spare capacity (doubling); the keys/values it returns are views.
    Anything that replaces ``keys``/``values`` (batch selection, :func:`keep_positions`) starts a new buffer."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, add = (self.keys.shape[-2] if self.keys.numel() else 0), key_states.shape[-2]
            buf = getattr(self, "_buffers", None)
            if buf is None or self.keys is not self._views[0] or n + add > buf[0].shape[-2]:
                cap = max(2 * (n + add), 256)
                buf = []
                for old, new in ((self.keys, key_states), (self.values, value_states)):
                    b = new.new_empty((*new.shape[:-2], cap, new.shape[-1]))
                    if n:
                        b[..., :n, :] = old
                    buf.append(b)
                self._buffers = buf
            self._buffers[0][..., n:n + add, :] = key_states
            self._buffers[1][..., n:n + add, :] = value_states
            self._views = (self._buffers[0][..., :n + add, :], self._buffers[1][..., :n + add, :])
            self.keys, self.values = self._views
            return self.keys, self.values

    return GrowingLayer


@functools.cache
def _slot_layer():
    """A KV-cache layer over a :class:`PrefixSlots` pair of buffers: the prefix first, a pass's positions after it."""
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
            super().__init__()
            self._full, self._length = (keys, values), length
            self.keys, self.values = keys[..., :length, :], values[..., :length, :]
            self.device, self.is_initialized = keys.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            n, add = self._length, key_states.shape[-2]
            if self.keys.shape[-2] != n or n + add > self._full[0].shape[-2]:
                raise ValueError(f"a prefix slot cache takes one pass of at most {self._full[0].shape[-2] - n} "
                                 f"positions; got {add} after {self.keys.shape[-2] - n}")
            for buffer, new in zip(self._full, (key_states, value_states)):
                buffer[..., n:n + add, :] = new
            self.keys, self.values = self._full[0][..., :n + add, :], self._full[1][..., :n + add, :]
            return self.keys, self.values

    return SlotLayer
