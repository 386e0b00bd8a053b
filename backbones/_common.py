"""Shared plumbing for every family: registration from the variant table, safe checkpoint loading,
argument validation, timm builds."""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import sys
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping

import timm
import torch
from timm.models import build_model_with_cfg, get_arch_pretrained_cfgs, register_model
from timm.models._registry import _model_to_module

from ..kernels.dispatch import fx_tracing

PREFIX = "mz_"
WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model_state_dict", "model", "module")
STRIP_PREFIXES = ("module.", "backbone.", "_orig_mod.")


def list_families() -> dict[str, list[str]]:
    """Family name (the module that registers it) -> sorted ``mz_*`` model names."""
    out: dict[str, list[str]] = defaultdict(list)
    for name in timm.list_models(f"{PREFIX}*"):
        out[_model_to_module[name]].append(name)
    return dict(out)


def model_name(family: str, size: str) -> str:
    """Registered name of one variant: ``mz_<family>_<size>`` (``mz_<family>`` for the size ``""``)."""
    return f"{PREFIX}{family}_{size}" if size else f"{PREFIX}{family}"


def register_family(module: str, variants: Mapping[str, Mapping[str, Any]], create: Callable[..., torch.nn.Module],
                    family: str | None = None) -> list[str]:
    """Register one timm entry function per row of ``variants`` (size -> keyword arguments of ``create``).

    ``mz_<family>_<size>(pretrained=False, **kwargs)`` calls ``create(name, pretrained, **{**row, **kwargs})``:
    as in timm, ``create_model`` keyword arguments override the row. The function is attributed to
    ``module`` (``__module__``, module attribute), so timm finds the module's ``default_cfgs`` (pretrained
    tags) and :func:`list_families` files it under the module's name. ``family`` defaults to that name.
    """
    mod = sys.modules[module]
    family = family or module.rsplit(".", 1)[-1]
    names = [model_name(family, size) for size in variants]
    for name, (size, row) in zip(names, variants.items()):
        entry = _entry_function(name, dict(row), create)
        entry.__module__ = module
        entry.__doc__ = f"``{name}``: row {size!r} of the variant table, built by ``{create.__module__}.{create.__name__}``."
        setattr(mod, name, register_model(entry))
    return names


def _entry_function(name: str, row: dict, create: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
    """timm entry function ``name(pretrained=False, **kwargs)`` building ``row`` overridden by ``kwargs``."""
    def entry(pretrained: bool = False, **kwargs):
        return create(name, pretrained, **{**row, **kwargs})
    entry.__name__ = entry.__qualname__ = name
    return entry


def unwrap_state_dict(obj: Any, use_ema: bool = False, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint object: unwraps ``model`` / ``state_dict`` / ... containers
    (``WRAPPER_KEYS``; the EMA ones only with ``use_ema``), strips wrapper prefixes, keeps tensors."""
    keys = WRAPPER_KEYS if use_ema else tuple(k for k in WRAPPER_KEYS if "ema" not in k)
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((k for k in keys if k in obj), None)
        if inner is None:
            raise ValueError(f"{source} holds no tensors under any of {keys}")
        obj = obj[inner]
    return {strip_prefixes(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_checkpoint(path: str | os.PathLike, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file without executing pickled code.

    Unwrapped by :func:`unwrap_state_dict`. A pickle that needs anything beyond tensors and plain
    containers raises (``weights_only=True``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return unwrap_state_dict(read_tensors(path), use_ema, source=f"checkpoint {path}")


def read_tensors(path: str) -> object:
    """The raw content of a ``.safetensors`` or weights-only torch file; any read error names the file
    (a refused pickle stays an ``UnpicklingError``, everything else becomes a ``ValueError``)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise pickle.UnpicklingError(f"checkpoint {path}: {err}") from err
    except Exception as err:  # safetensors' SafetensorError, torch's RuntimeError/EOFError on truncated files
        raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from err


def create_with_weights(name: str, path: str | os.PathLike, num_classes: int | None = None,
                        head_may_differ: bool = True, **kwargs) -> torch.nn.Module:
    """``timm.create_model(name)`` loaded from a local weights file, strictly: every key must match
    except, with ``head_may_differ``, the classifier head (the pretrained cfg's ``classifier``) when the
    file was trained for a different number of classes; that head starts at zero. Errors name the file
    and the keys.
    """
    from timm.models import get_pretrained_cfg

    path = os.fspath(path)
    sd = load_checkpoint(path)
    arch = name.split(".")[0]
    pcfg = get_pretrained_cfg(name) or get_pretrained_cfg(arch)
    heads = (pcfg.classifier if pcfg is not None else None) or ()
    n_out = num_classes if num_classes is not None else (pcfg.num_classes if pcfg is not None else 1000)
    for head in (heads,) if isinstance(heads, str) else heads:
        w, b = sd.get(f"{head}.weight"), sd.get(f"{head}.bias")
        if head_may_differ and w is not None and w.shape[0] != n_out:  # trained for other classes: a fresh (zero) head
            sd[f"{head}.weight"] = w.new_zeros((n_out, *w.shape[1:]))
            if b is not None:
                sd[f"{head}.bias"] = b.new_zeros(n_out)
    overlay = dict(state_dict=sd, num_classes=n_out)  # equal class counts: timm loads strictly
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=n_out, **kwargs)
    except (RuntimeError, KeyError, ValueError) as err:  # strict load_state_dict, or the family's key filter
        text = str(err)
        raise ValueError(f"checkpoint {path} does not fit {name}: "
                         f"{text[:2000]}{' ...' if len(text) > 2000 else ''}") from err


def strip_prefixes(key: str) -> str:
    """Remove wrapper prefixes (DDP ``module.``, detector ``backbone.``, compile ``_orig_mod.``)."""
    changed = True
    while changed:
        changed = False
        for p in STRIP_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Atomically write a safetensors file (temp file in the same folder, then ``os.replace``)."""
    from safetensors.torch import save_file
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, tmp)
    os.replace(tmp, path)


def check_input_size(x: torch.Tensor, min_size: int, name: str = "input") -> None:
    """Raise ``ValueError`` when the spatial size of NCHW ``x`` is below the network's total stride
    (not while torch.fx traces: its sizes are symbolic)."""
    if fx_tracing():
        return
    if x.ndim != 4:
        raise ValueError(f"{name} must be a 4-D NCHW image batch, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h < min_size or w < min_size:
        raise ValueError(f"{name} spatial size {h}x{w} is smaller than the total stride; "
                         f"accepted: height and width >= {min_size}")


def check_global_pool(pool_type: str, accepted: tuple[str, ...] = ("avg", "")) -> str:
    """``global_pool`` must be one of ``accepted`` (``""``: no pooling); returns it."""
    if pool_type not in accepted:
        raise ValueError(f"global_pool={pool_type!r} is not supported; accepted: {', '.join(map(repr, accepted))}")
    return pool_type


def check_in_chans(state_dict: Mapping[str, torch.Tensor], first_conv: str, model: torch.nn.Module) -> None:
    """A checkpoint's first conv must have 3 input channels (timm adapts those to any ``in_chans``)."""
    w = state_dict.get(f"{first_conv}.weight")
    if w is None or w.ndim != 4:
        return
    ckpt_in, model_in = w.shape[1], getattr(model, "in_chans", 3)
    if ckpt_in != 3 and ckpt_in != model_in:
        raise ValueError(f"in_chans={model_in} does not match the checkpoint ({ckpt_in} input channels "
                         f"in {first_conv}.weight); accepted: in_chans={ckpt_in}, or a 3-channel checkpoint")


def rename_keys(state_dict: Mapping[str, torch.Tensor], rules: Iterable[tuple[str, str]]) -> dict:
    """Apply ``(regex, replacement)`` rules in order to every key."""
    rules = [(re.compile(p), r) for p, r in rules]
    out = {}
    for k, v in state_dict.items():
        for pat, rep in rules:
            k = pat.sub(rep, k)
        out[k] = v
    return out


def match_shapes(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict:
    """Reshape tensors whose element count matches the model's (Linear <-> 1x1 conv, (C,) <-> (C,1,1))."""
    ref = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        if k in ref and v.shape != ref[k].shape and v.numel() == ref[k].numel():
            v = v.reshape(ref[k].shape)
        out[k] = v
    return out


def mirror_timm_cfgs(archs: Iterable[str], make_cfg: Callable[..., dict]) -> dict[str, dict]:
    """Our ``mz_<arch>.<tag>`` cfgs for every pretrained tag timm has for ``archs``.

    Each points at timm's hub repo for the same tag, so ``pretrained=True`` fetches timm's file,
    whose keys equal ours. ``make_cfg`` supplies the family's defaults.
    """
    out = {}
    for arch in archs:
        for full, cfg in get_arch_pretrained_cfgs(arch).items():
            kw = {k: v for k, v in cfg.to_dict().items() if v is not None and k not in ("hf_hub_id", "tag", "architecture")}
            kw["hf_hub_id"] = f"timm/{full}"
            out[f"{PREFIX}{full}"] = make_cfg(**kw)
    return out


def validate_out_indices(out_indices, num_stages: int) -> tuple[int, ...]:
    """Normalise ``out_indices``; anything outside ``[-num_stages, num_stages)`` is a ``ValueError``."""
    if isinstance(out_indices, int):
        out_indices = (out_indices,)
    out_indices = tuple(out_indices)
    bad = [i for i in out_indices if not isinstance(i, int) or not -num_stages <= i < num_stages]
    if bad or not out_indices:
        raise ValueError(f"out_indices={out_indices} is invalid; accepted: integers in "
                         f"[{-num_stages}, {num_stages - 1}] (one per stage)")
    return out_indices


def validate_tag(variant: str, pretrained_cfg) -> None:
    """Raise ``ValueError`` for ``mz_x.<tag>`` when ``<tag>`` is not a registered pretrained tag."""
    if not isinstance(pretrained_cfg, str):
        return
    tags = sorted(k.split(".", 1)[1] for k in get_arch_pretrained_cfgs(variant))
    if pretrained_cfg not in tags:
        raise ValueError(f"unknown pretrained tag {pretrained_cfg!r} for model {variant}; "
                         f"accepted tags: {', '.join(tags) or '(none)'}")


def build(model_cls, variant: str, pretrained: bool, *, num_stages: int = 4,
          pretrained_filter_fn: Callable | None = None, feature_cfg: dict | None = None, **kwargs):
    """``timm.models.build_model_with_cfg`` with our boundary checks (tag, ``out_indices``).

    timm's factory arguments ``device`` and ``dtype`` are honoured here for every family: the
    model is built under that default device (``meta`` allocates nothing) and then moved/cast.
    """
    validate_tag(variant, kwargs.get("pretrained_cfg"))
    out_indices = validate_out_indices(kwargs.pop("out_indices", tuple(range(num_stages))), num_stages)
    feature_cfg = dict(flatten_sequential=True, **(feature_cfg or {}), out_indices=out_indices)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=pretrained_filter_fn,
                                     feature_cfg=feature_cfg, **kwargs)
    return model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model


def like_model(module: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """``module`` (e.g. a new classifier) on the device and in the dtype and train/eval mode of ``model``."""
    p = next(model.parameters())
    return module.to(device=p.device, dtype=p.dtype).train(model.training)
