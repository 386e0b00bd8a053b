"""Launch-tile sweep of the depthwise 7x7 conv's Triton kernel (GPU), beside cuDNN.

For each tile ``BLOCK_HxBLOCK_WxBLOCK_Cxwarps`` at ConvFormer and MambaOut training shapes: the
relative error against the fp32 reference (forward output and input gradient), and the median
milliseconds of the Triton forward (activation fused) and of the Triton input gradient (the
activation's derivative and scalar grads fused), beside cuDNN's forward, input gradient and weight
gradient (cuDNN without the activation). Writes ``dwconv_sweep.json`` under ``--out``.

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

DEFAULT_CONFIGS = ("8x8x64x4,4x8x64x4,8x8x32x2,16x8x32x4,4x16x64x4,8x16x64x8,8x8x64x2,4x8x32x1,"
                   "16x4x64x4,4x4x64x2")


def shapes(batch: int):
    """(name, x NHWC view, act) at training shapes: ConvFormer-S18 stages 1-4 (after StarReLU; stage 1
    also without it, the activation's cost), MambaOut-tiny stage 1 (the 96-channel conv slice of a 512-channel fc1 output)."""
    bf = torch.bfloat16
    u = torch.randn(batch, 56, 56, 512, device="cuda", dtype=bf)
    s1 = torch.randn(batch, 56, 56, 128, device="cuda", dtype=bf)
    return [("convformer s1 128x56x56 +act", s1, True),
            ("convformer s1 128x56x56 no act", s1, False),
            ("convformer s2 256x28x28 +act", torch.randn(batch, 28, 28, 256, device="cuda", dtype=bf), True),
            ("convformer s3 640x14x14 +act", torch.randn(batch, 14, 14, 640, device="cuda", dtype=bf), True),
            ("convformer s4 1024x7x7 +act", torch.randn(batch, 7, 7, 1024, device="cuda", dtype=bf), True),
            ("mambaout s1 96 of 512 x56x56", u[..., 512 - 96:], False)]


def cudnn_ms(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> dict:
    """cuDNN's channels-last depthwise forward, input gradient and weight+bias gradient (no activation)."""
    C = x.shape[-1]
    xc, gc, wb = x.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2), w.to(x.dtype)

    def bwd(mask):
        return lambda: torch.ops.aten.convolution_backward(gc, xc, wb, [C], [1, 1], [3, 3], [1, 1], False, [0, 0],
                                                           C, mask)
    return dict(cudnn_fwd_ms=median_ms(lambda: F.conv2d(xc, wb, bias.to(x.dtype), padding=3, groups=C), 3, 20),
                cudnn_dx_ms=median_ms(bwd([True, False, False]), 3, 20),
                cudnn_dw_ms=median_ms(bwd([False, True, True]), 3, 20))


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
        base = cudnn_ms(x, g, w, bias)
        for t in configs:
            dx = torch.full(x.shape, float("nan"), device="cuda", dtype=x.dtype)
            y = dwconv.conv_forward(x, w, bias, s, sb, tiles=t)
            dwconv._launch(g, w, dx, False, t, flip=True, act_scale=s, act_in=x if act else None)
            row = dict(shape=name, tiles="x".join(map(str, t)), fwd_err=rel_err(y, ref), dx_err=rel_err(dx, xr.grad),
                       fwd_ms=median_ms(lambda: dwconv.conv_forward(x, w, bias, s, sb, tiles=t), 3, 20),
                       dx_ms=median_ms(lambda: dwconv._launch(g, w, dx, False, t, flip=True, act_scale=s,
                                                              act_in=x if act else None), 3, 20), **base)
            rows.append(row)
            print(f"{name:30s} {row['tiles']:10s} err {row['fwd_err']:.1e}/{row['dx_err']:.1e} "
                  f"fwd {row['fwd_ms']:.3f} dx {row['dx_ms']:.3f} ms | cuDNN fwd {base['cudnn_fwd_ms']:.3f} "
                  f"dx {base['cudnn_dx_ms']:.3f} dw {base['cudnn_dw_ms']:.3f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dwconv_sweep.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), batch=args.batch, rows=rows), f, indent=1)
    for name in dict.fromkeys(r["shape"] for r in rows):
        rs = [r for r in rows if r["shape"] == name]
        bf, bd = min(rs, key=lambda r: r["fwd_ms"]), min(rs, key=lambda r: r["dx_ms"])
        print(f"best {name}: fwd {bf['tiles']} {bf['fwd_ms']:.3f} (cuDNN {bf['cudnn_fwd_ms']:.3f}), "
              f"dx {bd['tiles']} {bd['dx_ms']:.3f} (cuDNN {bd['cudnn_dx_ms']:.3f}) ms")


if __name__ == "__main__":
    main()
