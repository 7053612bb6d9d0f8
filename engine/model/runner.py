"""Run a model, or a slice of its layers, with taps at sites.

A *tap* is a function of a site's activation viewed ``[B, T, C, D]`` that returns a replacement
or ``None`` (read only). ``forward`` runs the model's own HF forward, so masks, positions, rotary
embeddings and the attention implementation are the model's; on top of it:

- ``start_layer``/``resid``: blocks before ``start_layer`` are skipped (identity) and the block at
  ``start_layer`` receives ``resid`` [B, T', d_model] as its input;
- ``past``: keys and values of the first ``p`` positions (a :class:`KVPrefix` slice), so only the
  last ``T'`` positions are computed (causal attention leaves earlier positions unchanged);
- ``stop``: return the residual entering block ``stop`` (``n_layers``: the last block's output)
  instead of logits, skipping everything after it;
- ``noise``: ``[B, T, d_embed]`` added to the output of the input embedding module (Gaussian
  corruption, :mod:`causalscan.data.corruption`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from causalscan.model.adapters import FEATURE_SITES, Adapter

Tap = Callable[[torch.Tensor], "torch.Tensor | None"]
TapSpec = tuple[str, int, Tap]  # (site, layer, fn)


class _Stop(Exception):
    def __init__(self, value: torch.Tensor):
        self.value = value


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _with_first(x, new):
    return (new, *x[1:]) if isinstance(x, tuple) else new


def hidden_in(args, kwargs):
    """The hidden states a block (or a module taking them first) is called with."""
    return args[0] if args else kwargs["hidden_states"]


def with_hidden_in(args, kwargs, new):
    """``(args, kwargs)`` of a call with its hidden states replaced by ``new`` (a forward pre-hook's return)."""
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def _identity_block(hidden_states, *args, **kwargs):
    return hidden_states


@dataclass
class KVPrefix:
    """Keys and values of a base run, per layer ``[B, H_kv, T, d_head]``, to reuse as a prefix."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def from_cache(cls, cache) -> KVPrefix:
        return cls([lay.keys for lay in cache.layers], [lay.values for lay in cache.layers])

    def cache(self, rows: torch.Tensor, length: int, start_layer: int, config) -> DynamicCache | None:
        """A cache holding positions ``[0, length)`` of base rows ``rows`` for blocks >= start_layer.

        Skipped blocks get zero-stride placeholders of the right shape (no memory).
        """
        if length == 0:
            return None
        data = []
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if i < start_layer:
                shape = (len(rows), k.shape[1], length, k.shape[3])
                data.append((k.new_zeros(()).expand(shape), v.new_zeros(()).expand(v.shape[:1] + shape[1:])))
            else:
                r = rows.to(k.device)  # each layer's keys on its block's device
                data.append((k[r, :, :length], v[r, :, :length]))
        return DynamicCache(ddp_cache_data=data, config=config)


class _InFlight:
    """``(batch, seq)`` of the forward in flight, recorded at the input of every tapped block (a site's
    raw tensor may be flattened; its view needs them)."""

    bt: tuple[int, int] = (0, 0)

    def record(self, mod, args, kwargs) -> None:
        self.bt = tuple(hidden_in(args, kwargs).shape[:2])


@contextmanager
def installed(
    ad: Adapter,
    taps: Iterable[TapSpec],
    start_layer: int = 0,
    resid: torch.Tensor | None = None,
    stop: int | None = None,
    noise: torch.Tensor | None = None,
) -> Iterator[None]:
    """Install taps (and the start/stop/noise machinery) for the forwards run inside the block."""
    taps = list(taps)
    with ExitStack() as stack:

        def hold(handle):
            stack.callback(handle.remove)

        if noise is not None:
            hold(ad.model.get_input_embeddings().register_forward_hook(_noise_adder(noise)))
        for i in range(start_layer):
            stack.callback(restore_forward, ad.blocks[i], ad.blocks[i].__dict__.get("forward"))
            ad.blocks[i].forward = _identity_block
        shape = _InFlight()
        for layer in sorted({t[1] for t in taps}):
            hold(ad.blocks[layer].register_forward_pre_hook(shape.record, with_kwargs=True, prepend=True))
        if resid is not None:

            def inject(mod, args, kwargs):
                return with_hidden_in(args, kwargs, resid)

            hold(ad.blocks[start_layer].register_forward_pre_hook(inject, with_kwargs=True, prepend=True))
        if any(t[0] in FEATURE_SITES for t in taps):
            from causalscan.model.features import expand

            rewrites, reads = expand(ad, [t for t in taps if t[0] in FEATURE_SITES], shape)
            for module, hook in reads:
                hold(module.register_forward_pre_hook(hook, with_kwargs=True))
            taps = [t for t in taps if t[0] not in FEATURE_SITES] + rewrites
        for site, layer, fn in taps:
            if site == "resid_mid":
                _install_mid(ad, layer, fn, shape, hold)
            else:
                module, side = ad.hook_point(site, layer)
                hold(_install(ad, module, side, site, fn, shape))
        if stop is not None:
            hold(_install_stop(ad, stop))
        yield


def restore_forward(module, own) -> None:
    """Undo a replaced ``forward``: the module's class forward, or the instance's own ``own`` (accelerate's
    device hook) when it had one."""
    if own is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = own


def _noise_adder(noise: torch.Tensor):
    def add_noise(mod, args, out):
        if out.shape != noise.shape:
            raise ValueError(f"noise {tuple(noise.shape)} does not fit the embeddings {tuple(out.shape)}")
        return out + noise

    return add_noise


def _install_stop(ad: Adapter, stop: int):
    """Raise :class:`_Stop` with the residual entering block ``stop`` (or leaving the last block)."""
    if stop < ad.n_layers:

        def stop_in(mod, args, kwargs):
            raise _Stop(hidden_in(args, kwargs))

        return ad.blocks[stop].register_forward_pre_hook(stop_in, with_kwargs=True)

    def stop_out(mod, args, out):
        raise _Stop(_first(out))

    return ad.blocks[-1].register_forward_hook(stop_out)


def _apply(ad: Adapter, raw: torch.Tensor, site: str, fn: Tap, shape: _InFlight) -> torch.Tensor:
    b, t = shape.bt
    new = fn(ad.view(raw, site, b, t))
    return raw if new is None else ad.write(raw, site, b, t, new)


def _install(ad, module, side, site, fn, shape: _InFlight):
    if side == "in":

        def pre(mod, args, kwargs):
            return with_hidden_in(args, kwargs, _apply(ad, hidden_in(args, kwargs), site, fn, shape))

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(mod, args, out):
        return _with_first(out, _apply(ad, _first(out), site, fn, shape))

    return module.register_forward_hook(post)


def _install_mid(ad, layer, fn, shape: _InFlight, hold):
    """resid_mid = resid_pre + attn_out; rewriting it shifts attn_out by the change."""
    seen = {}

    def record(mod, args, kwargs):
        seen["pre"] = hidden_in(args, kwargs)

    hold(ad.blocks[layer].register_forward_pre_hook(record, with_kwargs=True))

    def post(mod, args, out):
        attn = _first(out)
        b, t = shape.bt
        mid = seen.pop("pre").reshape(b, t, 1, -1) + attn.reshape(b, t, 1, -1)
        new = fn(mid)
        return out if new is None else _with_first(out, (attn.reshape(mid.shape) + (new - mid)).reshape(attn.shape))

    module, _ = ad.hook_point("attn_out", layer)
    hold(module.register_forward_hook(post))


def forward(
    ad: Adapter,
    input_ids: torch.Tensor,
    taps: Iterable[TapSpec] = (),
    *,
    start_layer: int = 0,
    resid: torch.Tensor | None = None,
    past: DynamicCache | None = None,
    stop: int | None = None,
    logits_to_keep: int = 1,
    use_cache: bool = False,
    noise: torch.Tensor | None = None,
):
    """Run ``input_ids`` [B, T'] with taps; returns logits [B, keep, V] (or the residual at ``stop``).

    With ``use_cache=True`` returns ``(logits, cache)``.
    """
    if resid is None and start_layer:
        raise ValueError("start_layer > 0 needs the residual entering that layer")
    with installed(ad, taps, start_layer, resid, stop, noise):
        try:
            out = ad.model(
                input_ids=input_ids,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **({} if past is None else {_cache_arg(type(ad.model)): past}),
            )
        except _Stop as s:
            return s.value.to(input_ids.device)  # a split model's block may sit on another device
    if stop is not None:
        raise RuntimeError("stop hook did not fire")
    if not use_cache:
        return out.logits
    cache = getattr(out, "cache", None)
    return out.logits, (out.past_key_values if cache is None else cache)


@functools.cache
def _cache_arg(model_class: type) -> str:
    """The key/value cache argument of a model class's forward: ``cache`` from transformers 5.24,
    ``past_key_values`` before (looked up once per class, not on every patched forward)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def capture(ad: Adapter, site: str, layer: int, store: dict) -> TapSpec:
    """A read-only tap that stores the site's activation [B, T, C, D] in ``store[(site, layer)]``."""

    def fn(x):
        store[(site, layer)] = x

    return site, layer, fn


def run_with_cache(
    ad: Adapter,
    input_ids: torch.Tensor,
    sites: Iterable[tuple[str, int]],
    logits_to_keep: int = 1,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict, KVPrefix]:
    """One forward returning logits, activations at ``sites`` and the key/value prefix."""
    store: dict = {}
    logits, cache = forward(
        ad,
        input_ids,
        [capture(ad, s, layer, store) for s, layer in sites],
        logits_to_keep=logits_to_keep,
        use_cache=True,
        noise=noise,
    )
    return logits, store, KVPrefix.from_cache(cache)
