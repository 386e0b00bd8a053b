"""Kernel benchmark: each Triton kernel vs its PyTorch reference at real MetaFormer shapes (GPU).

Checks correctness first (bf16 kernel vs the reference run in fp32 on the same inputs, forward and
backward), then times forward and forward+backward with ``triton.testing.do_bench`` (median) and
reports the achieved bandwidth of the minimal traffic (each input read once, each output written
once) against the device's ~3 TB/s. Both sides run under bf16 autocast, as inside the models. Writes ``kernels.json`` and ``kernels.md`` under ``--out``.

``--compiled`` measures what ``kernels.dispatch.COMPILE_OPS`` decides instead: per case, fwd+bwd (then
forward) ms of ``torch.compile`` of a small function around the call, once with the custom op
(``custom``) and once with the op's reference (``inductor``: plain PyTorch that inductor decomposes),
written to ``kernels_compiled.json`` after every measurement; then one suggested table line per op.
Compilation dominates its run time (about 40 compilations). ``--tiny --device cpu`` is its smoke run
(8x8 maps, ``aot_eager`` instead of inductor, ``TRITON_INTERPRET=1``).

    python bench/kernels.py --out $OUT
    python bench/kernels.py --compiled --out $OUT
    TRITON_INTERPRET=1 python bench/kernels.py --compiled --tiny --device cpu --batch 2 --out /tmp/k
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from metazoo.kernels.act_linear import act_linear, act_linear_ref
from metazoo.kernels.dwconv import dwconv2d, dwconv2d_ref
from metazoo.kernels.gated_conv import gated_dwconv, gated_dwconv_linear, gated_dwconv_linear_ref, gated_dwconv_ref
from metazoo.kernels.group_norm import group_norm1, group_norm1_ref
from metazoo.kernels.norm_linear import norm_linear, norm_linear_ref
from metazoo.kernels.norm_residual import layer_norm, layer_norm_ref, norm_residual, norm_residual_ref, scale_add
from metazoo.kernels.norm_residual import scale_add_ref
from metazoo.kernels.pool_mixer import pool_mixer, pool_mixer_ref
from metazoo.kernels.star_relu import star_relu, star_relu_ref
from metazoo.kernels.dispatch import COMPILE_OPS
from _timing import rel_err
from models import git_commit

PEAK_GBS = 3000.0


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def cases(batch: int, device: str = "cuda", tiny: bool = False):
    """(name, fn, ref, activations, params, kwargs, bytes_fwd, bytes_fwd_bwd) at training shapes
    (``tiny``: every map 8x8, for CPU smoke runs)."""
    bf = torch.bfloat16
    dev = device

    def act(*shape, cl=True):
        if tiny:  # the spatial dims: (C, H, W) for NCHW, (H, W, C) for NHWC
            shape = (*shape[:2], 8, 8) if cl else (shape[0], 8, 8, shape[3])
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
    out.append(("layer_norm NHWC 56x56x96", layer_norm, layer_norm_ref, dict(x=x),
                dict(weight=par(96), bias=par(96)), dict(eps=1e-6), 2 * n, 2 * n + 3 * n))
    # The residual update closing every fused block (ConvFormer stage 1, residual scale, drop path 0.1).
    x, y = act(batch, 64, 56, 56), act(batch, 64, 56, 56)
    n = x.numel() * 2
    keep = (torch.rand(batch, device=dev) > 0.1).float() / 0.9
    out.append(("scale_add +rs +keep 64x56x56", scale_add, scale_add_ref, dict(x=x, y=y), dict(rs=par(64), ls=None),
                dict(channels_first=True, keep=keep), 3 * n, 3 * n + 4 * n))
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
    # Norm + fc1 keeping only the norm's input (the normalised copy is recomputed in backward): MambaOut-T
    # stage 1 (LayerNorm, 96 -> 512) and PoolFormer-S12 stage 1 (one-group GroupNorm, 1x1 conv 64 -> 256).
    # Bytes: the norm pass and the matmul's output; backward adds the recompute, dy, dn and dx.
    x = act(batch, 56, 56, 96, cl=False)
    n, ny = x.numel() * 2, x.numel() * 2 * 512 // 96
    out.append(("norm_linear LN 56x56 96->512", norm_linear, norm_linear_ref, dict(x=x),
                dict(weight=par(96), bias=par(96), fc_weight=par(512, 96, scale=0.1), fc_bias=par(512)),
                dict(eps=1e-6), 2 * n + ny, 2 * n + ny + (2 * n + ny + 3 * n)))
    x = act(batch, 64, 56, 56)
    n, ny = x.numel() * 2, x.numel() * 2 * 4
    out.append(("norm_linear GN1 64x56x56 ->256", norm_linear, norm_linear_ref, dict(x=x),
                dict(weight=par(64), bias=par(64), fc_weight=par(256, 64, 1, 1, scale=0.1), fc_bias=par(256)),
                dict(eps=1e-5, channels_first=True, norm="group1"), 3 * n + ny, 3 * n + ny + (3 * n + ny + 3 * n)))
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


def _autocast(device: str):
    """As inside the models: bf16 activations, fp32 parameters."""
    return torch.autocast(device, dtype=torch.bfloat16)


def _steps(call, acts, params, device: str):
    """``(fwd, fwd_bwd)`` closures around ``call(a, p)`` on fresh leaves of ``acts``/``params``: the
    forward under no_grad, and forward plus backward of fixed random cotangents into every leaf."""
    a = {k: v.detach().requires_grad_() for k, v in acts.items()}
    p = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in params.items()}
    leaves = list(a.values()) + [v for v in p.values() if v is not None]
    with _autocast(device):
        outs = _outputs(call(a, p))
    cots = [torch.randn_like(o) for o in outs]

    def fwd():
        with torch.no_grad(), _autocast(device):
            return call(a, p)

    def fwd_bwd():
        with _autocast(device):
            o = _outputs(call(a, p))
        torch.autograd.backward(o, cots, inputs=leaves)
        return o

    return fwd, fwd_bwd


def _ms(fn, device: str) -> float:
    """Median ms per call (do_bench on CUDA; on CPU one call, for smoke runs only)."""
    if device != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def time_case(fn, acts, params, kwargs, backend):
    fwd, fwd_bwd = _steps(lambda a, p: fn(**a, **p, **kwargs, backend=backend), acts, params, "cuda")
    return _ms(fwd, "cuda"), _ms(fwd_bwd, "cuda")


def compiled_case(fn, ref, acts, params, kwargs, device: str, passes) -> dict:
    """ms per pass of ``torch.compile`` around the call: ``custom`` (the registered op, Triton) and
    ``inductor`` (``ref``, decomposed and fused by inductor), the seconds their first calls took
    (compilation), and the relative error of the custom op's outputs against the compiled reference."""
    backend = "inductor" if device == "cuda" else "aot_eager"  # CPU: smoke run of the code path
    sides = {"custom": lambda a, p: fn(**a, **p, **kwargs, backend="triton"),
             "inductor": lambda a, p: ref(**a, **p, **kwargs)}
    row, outs = {}, {}
    for side, call in sides.items():
        torch._dynamo.reset()
        steps = dict(zip(("fwd", "fwd_bwd"), _steps(torch.compile(call, backend=backend), acts, params, device)))
        for name in passes:
            t0 = time.perf_counter()
            out = steps[name]()
            if device == "cuda":
                torch.cuda.synchronize()
            row[f"{side}_{name}_compile_s"] = time.perf_counter() - t0
            row[f"{side}_{name}_ms"] = _ms(steps[name], device)
            outs[side] = _outputs(out)
    row["out_rel_err"] = max(rel_err(c.float(), r.float()) for c, r in zip(outs["custom"], outs["inductor"]))
    return row


def table_lines(rows, device: str, batch: int) -> list[str]:
    """One ``COMPILE_OPS`` line per measured op: the faster side by summed fwd+bwd ms over its cases."""
    ops = {}
    for r in rows:
        if r["op"] in COMPILE_OPS and "custom_fwd_bwd_ms" in r and "inductor_fwd_bwd_ms" in r:
            ops.setdefault(r["op"], []).append(r)
    lines = []
    for op, rs in sorted(ops.items()):
        c, i = (sum(r[f"{side}_fwd_bwd_ms"] for r in rs) for side in ("custom", "inductor"))
        fwd = ""
        if all("custom_fwd_ms" in r and "inductor_fwd_ms" in r for r in rs):
            fwd = "; fwd {:.3f} / {:.3f}".format(*(sum(r[f"{side}_fwd_ms"] for r in rs) for side in ("custom", "inductor")))
        lines.append(f'    "{op}": "{"inductor" if i < c else "custom"}",  # compiled fwd+bwd ms custom / inductor: '
                     f"{c:.3f} / {i:.3f}{fwd} ({device}, bf16, batch {batch}, {len(rs)} case(s))")
    return lines


def run_compiled(args) -> None:
    """``--compiled``: every case under torch.compile, custom op vs reference; JSON after every case."""
    passes = [p for p in ("fwd_bwd", "fwd") if p in args.passes.split(",")]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = dict(device=device_name, torch=torch.__version__, batch=args.batch, dtype="bf16 autocast",
                tiny=args.tiny, passes=passes, commit=git_commit(), date=time.strftime("%Y-%m-%d"))
    rows = []
    for name, fn, ref, acts, params, kwargs, _, _ in cases(args.batch, args.device, args.tiny):
        if args.ops and fn.__name__ not in args.ops:
            continue
        row = dict(kernel=name, op=fn.__name__, **compiled_case(fn, ref, acts, params, kwargs, args.device, passes))
        rows.append(row)
        print(json.dumps(row), flush=True)
        path = os.path.join(args.out, "kernels_compiled.json")
        with open(path + ".tmp", "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        os.replace(path + ".tmp", path)
    lines = table_lines(rows, device_name, args.batch)
    with open(os.path.join(args.out, "kernels_compiled.md"), "w") as f:
        f.write("COMPILE_OPS lines (kernels/dispatch.py):\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--compiled", action="store_true", help="custom op vs reference under torch.compile")
    ap.add_argument("--passes", default="fwd_bwd,fwd", help="--compiled: which passes to time (fwd_bwd, fwd)")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only with --compiled --tiny (smoke run)")
    ap.add_argument("--tiny", action="store_true", help="8x8 maps (CPU smoke run)")
    ap.add_argument("--ops", default="", help="--compiled: only the cases of these ops (comma list; default all)")
    args = ap.parse_args(argv)
    known = {case[1].__name__ for case in cases(1, "meta")}
    args.ops = [o for o in args.ops.split(",") if o]
    if set(args.ops) - known:
        raise ValueError(f"--ops: unknown {sorted(set(args.ops) - known)}; accepted: {', '.join(sorted(known))}")
    if args.device not in ("cuda", "cpu"):
        raise ValueError(f"--device: {args.device!r}; accepted: cuda, cpu")
    if not set(args.passes.split(",")) <= {"fwd_bwd", "fwd"} or not args.passes:
        raise ValueError(f"--passes: {args.passes!r}; accepted: a comma list of fwd_bwd, fwd")
    torch.manual_seed(0)
    if args.compiled:
        run_compiled(args)
        return
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
                peak_gbs_assumed=PEAK_GBS, commit=git_commit(), date=time.strftime("%Y-%m-%d"))
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
