"""Convert an official AFFNet checkpoint (ml-cvnets layout) to a safetensors file in our layout.

    python -m metazoo.backbones._affnet_convert affnet_small_best.pt mz_affnet.safetensors

The variant is read from the checkpoint's widths; the result is loaded strictly into the model
before it is written (atomically), so a file that is written is a file that loads.
"""
from __future__ import annotations

import argparse

import timm

from ._common import load_checkpoint, model_name, save_state_dict
from .affnet import VARIANTS, convert_official

NAMES = [model_name("affnet", size) for size in VARIANTS]
_PROBE = "layer_5.0.block.red_1x1.block.conv.weight"  # its output channels = the last stage width


def detect_variant(state_dict) -> str:
    """``mz_affnet*`` whose last stage width matches the checkpoint; ``ValueError`` otherwise."""
    if _PROBE not in state_dict:
        raise ValueError(f"not an official AFFNet checkpoint: key {_PROBE!r} is missing")
    width = state_dict[_PROBE].shape[0]
    last = {name: row["widths"][-1] for name, row in zip(NAMES, VARIANTS.values())}
    for name, w in last.items():
        if w == width:
            return name
    raise ValueError(f"last stage width {width} matches no variant; accepted: "
                     + ", ".join(f"{n} ({w})" for n, w in last.items()))


def convert_file(src: str, dst: str, variant: str | None = None) -> str:
    """Read ``src`` (weights only), convert, verify with a strict load, write ``dst``; returns the variant."""
    sd = load_checkpoint(src)
    variant = variant or detect_variant(sd)
    if variant not in NAMES:
        raise ValueError(f"variant={variant!r} is unknown; accepted: {', '.join(NAMES)}")
    model = timm.create_model(variant)
    ours = convert_official(sd, tuple(len(s.blocks) for s in model.stages))
    model.load_state_dict(ours, strict=True)
    save_state_dict(ours, dst)
    return variant


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="official checkpoint (.pt)")
    p.add_argument("dst", help="output .safetensors")
    p.add_argument("--variant", choices=NAMES, default=None, help="default: detected from widths")
    args = p.parse_args(argv)
    print(f"{args.src} -> {args.dst} ({convert_file(args.src, args.dst, args.variant)})")


if __name__ == "__main__":
    main()
