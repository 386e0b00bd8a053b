"""The model table: every registered ``mz_*`` model with params, GMACs and feature layout, computed."""
from __future__ import annotations

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from .backbones import list_families


def count(name: str, input_size: tuple[int, int, int] | None = None) -> dict:
    """Params (M) and GMACs of one model at its default (or the given) input size, on the meta device."""
    with torch.device("meta"):
        model = timm.create_model(name).eval()
        size = input_size or model.pretrained_cfg.get("input_size", (3, 224, 224))
        x = torch.empty(1, *size)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(x)
    info = getattr(model, "feature_info", [])
    return dict(model=name, params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                gmacs=fc.get_total_flops() / 2e9, input_size=tuple(size),
                channels=[f["num_chs"] for f in info], strides=[f["reduction"] for f in info])


def table(names: list[str] | None = None) -> list[dict]:
    """Rows of :func:`count` for ``names`` (default: every registered model, family by family)."""
    if names is None:
        names = [n for fam in sorted(list_families().values()) for n in fam]
    return [count(n) for n in names]


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`table` rows."""
    lines = ["| model | params (M) | GMACs | input | feature channels | strides |", "|---|---:|---:|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params_m']:.1f} | {r['gmacs']:.2f} | {r['input_size'][1]}x{r['input_size'][2]} "
                     f"| {','.join(map(str, r['channels']))} | {','.join(map(str, r['strides']))} |")
    return "\n".join(lines)
