"""Launch-tile sweep of the depthwise 7x7 conv's Triton input-gradient pass (GPU), beside cuDNN.

For each tile ``BLOCK_HxBLOCK_WxBLOCK_Cxwarps`` at ConvFormer and MambaOut training shapes: the
relative error against the fp32 reference (forward output and input gradient), and the median
milliseconds of ``conv_backward`` (Triton input gradient with the activation's grads, plus cuDNN's
weight gradient) beside cuDNN's input + weight gradient; ``conv_forward`` is cuDNN's forward.
Writes ``dwconv_sweep.json`` under ``--out``.

    python bench/dwconv_sweep.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from metazoo.kernels import dwconv
from _timing import median_ms, rel_err

DEFAULT_CONFIGS = ("1x16x64x4,1x32x64x4,2x16x64x4,4x8x64x4,4x16x64x4,4x16x32x4,8x8x64x4,"
                   "4x16x64x8,8x16x64x8,2x8x128x4,4x8x128x8,8x32x32x8")


def shapes(batch: int):
    """(name, x NHWC view, act) at training shapes: ConvFormer-S18 stages 1 and 3 (after StarReLU),
    MambaOut-tiny stage 1 (the 96-channel conv slice of a 512-channel fc1 output)."""
    bf = torch.bfloat16
    u = torch.randn(batch, 56, 56, 512, device="cuda", dtype=bf)
    return [("convformer s1 128x56x56 +act", torch.randn(batch, 56, 56, 128, device="cuda", dtype=bf), True),
            ("convformer s3 640x14x14 +act", torch.randn(batch, 14, 14, 640, device="cuda", dtype=bf), True),
            ("mambaout s1 96 of 512 x56x56", u[..., 512 - 96:], False)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    args = ap.parse_args()
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",") if c]
    rows = []
    for name, x, act in shapes(args.batch):
        C = x.shape[-1]
        w = torch.randn(C, 1, 7, 7, device="cuda") * 0.1
        bias = torch.randn(C, device="cuda")
        s = torch.tensor([0.9], device="cuda") if act else None
        sb = torch.tensor([0.1], device="cuda") if act else None
        g = torch.randn(x.shape, device="cuda", dtype=x.dtype)
        xr = x.detach().float().requires_grad_(True)
        ref = dwconv.dwconv2d_ref(xr, w, bias, s, sb, channels_first=False)
        ref.backward(g.float())
        xc = x.permute(0, 3, 1, 2)
        wb = w.to(x.dtype)
        cudnn_ms = median_ms(lambda: F.conv2d(xc, wb, bias.to(x.dtype), padding=3, groups=C), 3, 20)
        gc = g.permute(0, 3, 1, 2)
        cudnn_bwd_ms = median_ms(lambda: torch.ops.aten.convolution_backward(
            gc, xc, wb, [C], [1, 1], [3, 3], [1, 1], False, [0, 0], C, [True, True, True]), 3, 20)
        y = dwconv.conv_forward(x, w, bias, s, sb)
        fwd_ms = median_ms(lambda: dwconv.conv_forward(x, w, bias, s, sb), 3, 20)
        for t in configs:
            dx = torch.full(x.shape, float("nan"), device="cuda", dtype=x.dtype)
            dwconv.conv_backward(g, x, w, True, s, sb, dx, tiles=t)
            row = dict(shape=name, tiles="x".join(map(str, t)), fwd_err=rel_err(y, ref), dx_err=rel_err(dx, xr.grad),
                       fwd_ms=fwd_ms,
                       bwd_ms=median_ms(lambda: dwconv.conv_backward(g, x, w, True, s, sb, dx, tiles=t), 3, 20),
                       cudnn_fwd_ms=cudnn_ms, cudnn_bwd_ms=cudnn_bwd_ms)
            rows.append(row)
            print(f"{name:32s} {row['tiles']:10s} err {row['fwd_err']:.1e}/{row['dx_err']:.1e} "
                  f"fwd {fwd_ms:.3f} bwd {row['bwd_ms']:.3f} ms (cuDNN fwd {cudnn_ms:.3f}, "
                  f"bwd {cudnn_bwd_ms:.3f} without the activation)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dwconv_sweep.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), batch=args.batch, rows=rows), f, indent=1)
    for name in dict.fromkeys(r["shape"] for r in rows):
        best = min((r for r in rows if r["shape"] == name), key=lambda r: r["bwd_ms"])
        print(f"best {name}: {best['tiles']} fwd {best['fwd_ms']:.3f} bwd {best['bwd_ms']:.3f} ms")


if __name__ == "__main__":
    main()
