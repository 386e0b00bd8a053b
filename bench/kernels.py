"""Kernel benchmark: each Triton kernel vs its PyTorch reference at real MetaFormer shapes (GPU).

Checks correctness first (bf16 kernel vs the reference run in fp32 on the same inputs, forward and
backward), then times forward and forward+backward with ``triton.testing.do_bench`` (median) and
reports the achieved bandwidth of the minimal traffic (each input read once, each output written
once) against the device's ~3 TB/s. Both sides run under bf16 autocast, as inside the models. Writes ``kernels.json`` and ``kernels.md`` under ``--out``.

    python bench/kernels.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from metazoo.kernels.act_linear import act_linear, act_linear_ref
from metazoo.kernels.dwconv import dwconv2d, dwconv2d_ref
from metazoo.kernels.gated_conv import gated_dwconv, gated_dwconv_linear, gated_dwconv_linear_ref, gated_dwconv_ref
from metazoo.kernels.group_norm import group_norm1, group_norm1_ref
from metazoo.kernels.norm_residual import norm_residual, norm_residual_ref
from metazoo.kernels.pool_mixer import pool_mixer, pool_mixer_ref
from metazoo.kernels.star_relu import star_relu, star_relu_ref
from _timing import rel_err

PEAK_GBS = 3000.0


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def cases(batch: int):
    """(name, fn, ref, activations, params, kwargs, bytes_fwd, bytes_fwd_bwd) at training shapes."""
    bf = torch.bfloat16
    dev = "cuda"

    def act(*shape, cl=True):
        t = torch.randn(*shape, device=dev, dtype=bf)
        return _cl(t) if cl else t

    def par(*shape, scale=1.0):
        return torch.randn(*shape, device=dev) * scale

    out = []
    # ConvFormer/CAFormer stage 1 after the mixer: residual add + LayerNorm2d (no bias).
    x, y = act(batch, 64, 56, 56), act(batch, 64, 56, 56)
    n = x.numel() * 2
    out.append(("norm_residual LN2d 64x56x56", norm_residual, norm_residual_ref, dict(x=x, y=y),
                dict(rs=None, ls=None, weight=par(64), bias=None), dict(eps=1e-6, channels_first=True),
                4 * n, 4 * n + 5 * n))
    # Stage 3 with residual scale (res_scale_init 1.0), 320 channels.
    x, y = act(batch, 320, 14, 14), act(batch, 320, 14, 14)
    n = x.numel() * 2
    out.append(("norm_residual LN2d+rs 320x14x14", norm_residual, norm_residual_ref, dict(x=x, y=y),
                dict(rs=par(320), ls=None, weight=par(320), bias=None), dict(eps=1e-6, channels_first=True),
                4 * n, 4 * n + 6 * n))
    # MambaOut NHWC LayerNorm (with bias).
    x = act(batch, 56, 56, 96, cl=False)
    n = x.numel() * 2
    out.append(("layer_norm NHWC 56x56x96", norm_residual, norm_residual_ref, dict(x=x),
                dict(weight=par(96), bias=par(96)), dict(eps=1e-6), 2 * n, 2 * n + 3 * n))
    # MLP activation, stage 1 hidden (4 * 64).
    x = act(batch, 256, 56, 56)
    n = x.numel() * 2
    out.append(("star_relu 256x56x56", star_relu, star_relu_ref, dict(x=x), dict(scale=par(1), bias=par(1)), {},
                2 * n, 2 * n + 3 * n))
    # SepConv: StarReLU fused into the 7x7 depthwise conv, stage 1 (mid = 2 * 64).
    x = act(batch, 128, 56, 56)
    n = x.numel() * 2
    out.append(("dwconv7 +starrelu 128x56x56", dwconv2d, dwconv2d_ref, dict(x=x),
                dict(weight=par(128, 1, 7, 7, scale=0.1), bias=None, act_scale=par(1), act_bias=par(1)),
                dict(channels_first=True), 2 * n, 2 * n + 3 * n))
    x = act(batch, 640, 14, 14)
    n = x.numel() * 2
    out.append(("dwconv7 +starrelu 640x14x14", dwconv2d, dwconv2d_ref, dict(x=x),
                dict(weight=par(640, 1, 7, 7, scale=0.1), bias=None, act_scale=par(1), act_bias=par(1)),
                dict(channels_first=True), 2 * n, 2 * n + 3 * n))
    # MambaOut-T stage 1: fc1 output (2 * 256 channels), conv on the last 96.
    u = act(batch, 56, 56, 512, cl=False)
    n = u.numel() * 2
    out.append(("gated_dwconv 56x56 h256 c96", gated_dwconv, gated_dwconv_ref, dict(u=u),
                dict(weight=par(96, 1, 7, 7, scale=0.1), bias=par(96)), dict(hidden=256),
                n + n // 2, n + n // 2 + (n // 2 + 2 * n)))
    out.append(("gated_dwconv_linear 56x56 h256 c96 ->96", gated_dwconv_linear, gated_dwconv_linear_ref, dict(u=u),
                dict(weight=par(96, 1, 7, 7, scale=0.1), bias=par(96), fc_weight=par(96, 256, scale=0.06),
                     fc_bias=par(96)), dict(hidden=256),
                n + 3 * n // 16, n + 3 * n // 16 + (3 * n // 16 + 2 * n)))
    # MLP second half (act + fc2, act recomputed in backward), ConvFormer stage 1: 256 -> 64.
    z = act(batch, 256, 56, 56)
    n = z.numel() * 2
    out.append(("act_linear star_relu 256->64 56x56", act_linear, act_linear_ref, dict(z=z),
                dict(fc_weight=par(64, 256, 1, 1, scale=0.06), fc_bias=None, act_scale=par(1), act_bias=par(1)),
                dict(act="star_relu", channels_first=True), n + n // 4, n + n // 4 + (2 * n + n // 4)))
    # PoolFormer stage 1: GroupNorm1 and the fused pooling mixer.
    x = act(batch, 64, 56, 56)
    n = x.numel() * 2
    out.append(("group_norm1 64x56x56", group_norm1, group_norm1_ref, dict(x=x), dict(weight=par(64), bias=par(64)),
                dict(eps=1e-5), 3 * n, 3 * n + 5 * n))
    out.append(("pool_mixer 64x56x56", pool_mixer, pool_mixer_ref, dict(x=x),
                dict(norm_weight=par(64), norm_bias=par(64), ls=par(64), rs=None), dict(eps=1e-5),
                3 * n, 3 * n + 5 * n))
    return out


def _outputs(res):
    res = res if isinstance(res, tuple) else (res,)
    return [r for r in res if torch.is_tensor(r)]


def check(name, fn, ref, acts, params, kwargs):
    """Max relative error of the bf16 kernel vs the fp32 reference, over outputs and all gradients."""
    def leaves(dt_act):
        a = {k: v.detach().to(dt_act).requires_grad_() for k, v in acts.items()}
        p = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in params.items()}
        return a, p

    ak, pk = leaves(torch.bfloat16)
    ar, pr = leaves(torch.float32)
    ok = _outputs(fn(**ak, **pk, **kwargs, backend="triton"))
    orr = _outputs(ref(**ar, **pr, **kwargs))
    cots = [torch.randn_like(o) for o in ok]
    ins_k = list(ak.values()) + [v for v in pk.values() if v is not None]
    ins_r = list(ar.values()) + [v for v in pr.values() if v is not None]
    gk = torch.autograd.grad(sum((o.float() * c.float()).sum() for o, c in zip(ok, cots)), ins_k, allow_unused=True)
    gr = torch.autograd.grad(sum((o * c.float()).sum() for o, c in zip(orr, cots)), ins_r, allow_unused=True)
    errs = {}
    for i, (a, b) in enumerate(zip(ok, orr)):
        errs[f"out{i}"] = rel_err(a, b)
    scale = max(b.norm().item() for b in gr if b is not None)
    for i, (a, b) in enumerate(zip(gk, gr)):
        # a gradient that is zero in exact arithmetic (PoolFormer's norm bias) is rounding noise in the
        # reference: compare it absolutely, relative to the largest gradient
        if a is not None and b is not None:
            errs[f"grad{i}"] = rel_err(a, b) if b.norm() > 1e-4 * scale else (a - b).norm().item() / scale
    return errs


def time_case(fn, acts, params, kwargs, backend):
    from triton.testing import do_bench

    a = {k: v.detach().requires_grad_() for k, v in acts.items()}
    p = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in params.items()}
    kw = dict(kwargs, backend=backend)

    def autocast():  # as inside the models: bf16 activations, fp32 parameters
        return torch.autocast("cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad(), autocast():
            return fn(**a, **p, **kw)

    with autocast():
        outs = _outputs(fn(**a, **p, **kw))
    cots = [torch.randn_like(o) for o in outs]
    leaves = list(a.values()) + [v for v in p.values() if v is not None]

    def fwd_bwd():
        with autocast():
            o = _outputs(fn(**a, **p, **kw))
        torch.autograd.backward(o, cots, inputs=leaves)

    t_f = do_bench(fwd, warmup=25, rep=100, return_mode="median")
    t_fb = do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median")
    return t_f, t_fb


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, fn, ref, acts, params, kwargs, b_f, b_fb in cases(args.batch):
        errs = check(name, fn, ref, acts, params, kwargs)
        tk = time_case(fn, acts, params, kwargs, "triton")
        tr = time_case(fn, acts, params, kwargs, "torch")
        row = dict(kernel=name, max_rel_err=max(errs.values()), errors=errs,
                   triton_fwd_ms=tk[0], torch_fwd_ms=tr[0], triton_fwd_bwd_ms=tk[1], torch_fwd_bwd_ms=tr[1],
                   speedup_fwd=tr[0] / tk[0], speedup_fwd_bwd=tr[1] / tk[1],
                   triton_fwd_gbs=b_f / tk[0] / 1e6, triton_fwd_bwd_gbs=b_fb / tk[1] / 1e6)
        rows.append(row)
        print(f"{name:32s} err {row['max_rel_err']:.1e}  fwd {tk[0]:.3f} vs {tr[0]:.3f} ms "
              f"({row['speedup_fwd']:.2f}x, {row['triton_fwd_gbs']:.0f} GB/s)  fwd+bwd {tk[1]:.3f} vs {tr[1]:.3f} ms "
              f"({row['speedup_fwd_bwd']:.2f}x, {row['triton_fwd_bwd_gbs']:.0f} GB/s)", flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, batch=args.batch, dtype="bfloat16",
                peak_gbs_assumed=PEAK_GBS)
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = ["| kernel | max rel err | fwd ms triton / torch | fwd+bwd ms triton / torch | fwd GB/s (% of 3 TB/s) | fwd+bwd GB/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['max_rel_err']:.1e} | {r['triton_fwd_ms']:.3f} / {r['torch_fwd_ms']:.3f} "
                     f"({r['speedup_fwd']:.2f}x) | {r['triton_fwd_bwd_ms']:.3f} / {r['torch_fwd_bwd_ms']:.3f} "
                     f"({r['speedup_fwd_bwd']:.2f}x) | {r['triton_fwd_gbs']:.0f} ({r['triton_fwd_gbs'] / PEAK_GBS:.0%}) "
                     f"| {r['triton_fwd_bwd_gbs']:.0f} |")
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
