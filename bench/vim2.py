"""Is the selective-scan kernel right at real shapes, how close is it to memory speed, and how does
ViM2-T compare with MambaOut-tiny and CAFormer-S18?

One GPU run: (1) kernel vs the sequential reference (float64) at L = 3136, N = 16, D = 192 / 384 /
768 and the token mixer's 4-group layout, forward and the gradients of u, Δ, A, B, C, D, Δ-bias,
fp32 and bf16 operands; (2) a launch-config sweep at L = 3136, D = 384, N = 16, batch 64; (3) the
best config's fwd+bwd time against the sequential reference and against the memory-traffic lower
bound (bytes each input read once and each output written once, over the measured copy bandwidth);
(4) ViM2-T, MambaOut-tiny and CAFormer-S18 inference and training img/s and peak memory (bf16
autocast). Writes ``vim2.json`` and ``vim2.md`` under ``--out`` (default ``$OUT`` or bench/results).

    python bench/vim2.py
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

import metazoo  # noqa: F401  (registers the models)
from metazoo.kernels import selective_scan as ss
from _timing import median_ms, rel_err

CONFIGS = [(32, 4, 4), (16, 8, 4), (16, 16, 4), (64, 4, 8)]  # (block_d, chunk, num_warps)
MODELS = ["mz_vim2_t", "mz_mambaout_tiny", "mz_caformer_s18"]


def _inputs(bsz, dim, seqlen, n, groups, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    u = r(bsz, dim, seqlen).to(dtype)
    delta = (r(bsz, dim, seqlen) - 2.0).to(dtype)  # softplus(-2 + noise): Δ around 0.13
    A = -torch.exp(r(dim, n) * 0.5 + 1.0)
    B = r(bsz, groups, n, seqlen).to(dtype)
    C = r(bsz, groups, n, seqlen).to(dtype)
    return [u, delta, A, B, C, r(dim), 0.5 * r(dim)]


def check(device) -> list[dict]:
    """Kernel vs float64 sequential reference at real lengths; every output and gradient."""
    rows = []
    cases = [(192, 1, torch.float32), (384, 1, torch.float32), (768, 1, torch.float32), (768, 4, torch.float32),
             (384, 1, torch.bfloat16), (768, 4, torch.bfloat16)]
    for dim, groups, dtype in cases:
        xs = [t.requires_grad_() for t in _inputs(2, dim, 3136, 16, groups, dtype, device, seed=dim + groups)]
        y = ss.selective_scan(*xs, delta_softplus=True, backend="triton")
        gy = torch.randn_like(y)
        grads = torch.autograd.grad(y, xs, gy)
        ref_in = [t.detach().double().requires_grad_() for t in xs]
        y_ref = ss.selective_scan_ref(*ref_in, delta_softplus=True)
        ref_grads = torch.autograd.grad(y_ref, ref_in, gy.double())
        errs = {"y": rel_err(y, y_ref)}
        errs.update({k: rel_err(a, b) for k, a, b in zip(["du", "ddelta", "dA", "dB", "dC", "dD", "dbias"], grads,
                                                      ref_grads)})
        rows.append(dict(D=dim, groups=groups, L=3136, N=16, batch=2, dtype=str(dtype).split(".")[-1],
                         max_rel_err=max(errs.values()), rel_err=errs,
                         finite=bool(torch.isfinite(y).all()) and all(bool(torch.isfinite(g).all()) for g in grads)))
        print(f"check D={dim} G={groups} {dtype}: max rel err {rows[-1]['max_rel_err']:.2e}", flush=True)
    return rows


def copy_bandwidth(device) -> float:
    """Device memory bandwidth (bytes read + written per second) of a large copy."""
    a = torch.empty(2 * 2**30 // 4, device=device)
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a), 2, 10)
    return 2 * a.numel() * 4 / (ms * 1e-3)


def traffic_bytes(bsz, dim, seqlen, n, esize) -> dict:
    """Fewest bytes: fwd reads u, Δ, B, C and writes y; bwd reads u, Δ, B, C, dy and writes du, dΔ, dB, dC."""
    bdl, bnl = bsz * dim * seqlen, bsz * n * seqlen
    return dict(fwd=(3 * bdl + 2 * bnl) * esize, bwd=(5 * bdl + 4 * bnl) * esize)


def bench_scan(device, bw: float, configs_fp32=CONFIGS) -> dict:
    """Launch-config sweep at the issue's shape; the shipped default (``ss._GPU_CFG``) is always
    timed, reported beside the sweep's best, and restored afterwards for the model runs."""
    bsz, dim, seqlen, n = 64, 384, 3136, 16
    default = (ss._GPU_CFG["block_d"], ss._GPU_CFG["chunk"], ss._GPU_CFG["num_warps"])
    out = dict(shape=dict(batch=bsz, D=dim, L=seqlen, N=n), copy_bandwidth_tbps=bw / 1e12, sweep=[],
               default_config=dict(block_d=default[0], chunk=default[1], num_warps=default[2]))
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        xs = [t.requires_grad_() for t in _inputs(bsz, dim, seqlen, n, 1, dtype, device)]
        gy = torch.randn(bsz, dim, seqlen, device=device, dtype=dtype)

        def fwd():
            with torch.no_grad():
                ss.selective_scan(*xs, delta_softplus=True, backend="triton")

        def fwd_bwd():
            y = ss.selective_scan(*xs, delta_softplus=True, backend="triton")
            torch.autograd.grad(y, xs, gy)

        # the whole sweep in fp32; bf16 operands with the default and the fp32 winner (compiles cost device time)
        if dtype == torch.float32:
            configs = list(dict.fromkeys([default, *configs_fp32]))
        else:
            b32 = out["best_float32"]
            configs = list(dict.fromkeys([default, (b32["block_d"], b32["chunk"], b32["num_warps"])]))
        for cfg in configs:
            ss._GPU_CFG.update(block_d=cfg[0], chunk=cfg[1], num_warps=cfg[2])
            row = dict(dtype=name, block_d=cfg[0], chunk=cfg[1], num_warps=cfg[2])
            try:
                row.update(fwd_ms=median_ms(fwd), fwd_bwd_ms=median_ms(fwd_bwd))
            except Exception as e:  # a config that fails to compile is reported, not fatal
                row.update(error=repr(e)[:300])
            out["sweep"].append(row)
            print("sweep", row, flush=True)
        ss._GPU_CFG.update(block_d=default[0], chunk=default[1], num_warps=default[2])
        esize = torch.finfo(dtype).bits // 8
        tb = traffic_bytes(bsz, dim, seqlen, n, esize)
        bound_ms = (tb["fwd"] + tb["bwd"]) / bw * 1e3
        ok = [r for r in out["sweep"] if r["dtype"] == name and "error" not in r]
        picks = dict(best=min(ok, key=lambda r: r["fwd_bwd_ms"]),
                     default=next(r for r in ok if (r["block_d"], r["chunk"], r["num_warps"]) == default))
        for key, r in picks.items():
            out[f"{key}_{name}"] = dict(r, traffic_bytes=tb, bound_fwd_bwd_ms=bound_ms,
                                        ratio_to_bound=r["fwd_bwd_ms"] / bound_ms,
                                        bound_fwd_ms=tb["fwd"] / bw * 1e3,
                                        fwd_ratio_to_bound=r["fwd_ms"] / (tb["fwd"] / bw * 1e3))
    ref = reference_time(device, bsz, dim, seqlen, n)
    out["reference"] = ref
    if "fwd_bwd_ms" in ref:
        out["speedup_vs_reference_fp32"] = (ref["fwd_bwd_ms"] * (bsz / ref["batch"])
                                            / out["default_float32"]["fwd_bwd_ms"])
    return out


def reference_time(device, bsz, dim, seqlen, n) -> dict:
    """Sequential reference fwd+bwd (fp32), at batch 64 or, if that runs out of memory, a smaller batch."""
    for b in (bsz, bsz // 4, bsz // 16):
        try:
            xs = [t.requires_grad_() for t in _inputs(b, dim, seqlen, n, 1, torch.float32, device)]
            gy = torch.randn(b, dim, seqlen, device=device)
            torch.cuda.reset_peak_memory_stats()

            def step():
                y = ss.selective_scan_ref(*xs, delta_softplus=True)
                torch.autograd.grad(y, xs, gy)

            ms = median_ms(step, 1, 3)
            return dict(batch=b, fwd_bwd_ms=ms, peak_gb=torch.cuda.max_memory_allocated() / 2**30,
                        note="time scaled linearly to batch 64" if b != bsz else "")
        except torch.OutOfMemoryError:
            xs = gy = None
            torch.cuda.empty_cache()
    return dict(error="reference ran out of memory at every batch tried")


def bench_model(name: str, infer_batch: int, train_batch: int, device) -> dict:
    import timm

    model = timm.create_model(name, num_classes=1000).to(device).to(memory_format=torch.channels_last)
    res = dict(model=name, params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    model.eval()
    x = torch.randn(infer_batch, 3, 224, 224, device=device).to(memory_format=torch.channels_last)

    def infer():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    torch.cuda.reset_peak_memory_stats()
    ms = median_ms(infer, 3, 10)
    res.update(infer_img_s=infer_batch / ms * 1e3, infer_peak_gb=torch.cuda.max_memory_allocated() / 2**30)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    xt = x[:train_batch].clone()
    yt = torch.randint(0, 1000, (train_batch,), device=device)

    def train():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    ms = median_ms(train, 2, 5)
    res.update(train_img_s=train_batch / ms * 1e3, train_peak_gb=torch.cuda.max_memory_allocated() / 2**30,
               infer_batch=infer_batch, train_batch=train_batch)
    print("model", res, flush=True)
    return res


def table(result: dict) -> str:
    lines = ["| check | D | G | dtype | max rel err |", "|---|---|---|---|---|"]
    lines += [f"| scan L=3136 N=16 | {r['D']} | {r['groups']} | {r['dtype']} | {r['max_rel_err']:.2e} |"
              for r in result.get("check", [])]
    sc = result.get("scan", {})
    if sc:
        lines += ["", "| scan B=64 D=384 L=3136 N=16 | fwd ms | fwd+bwd ms | bound fwd+bwd ms | x bound |",
                  "|---|---|---|---|---|"]
        for key in ("default_float32", "default_bfloat16", "best_float32", "best_bfloat16"):
            if key in sc:
                r = sc[key]
                lines.append(f"| kernel {r['dtype']}, {key.split('_')[0]} (block_d={r['block_d']}, chunk="
                             f"{r['chunk']}, warps={r['num_warps']}) | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
                             f"{r['bound_fwd_bwd_ms']:.2f} | {r['ratio_to_bound']:.2f} |")
        ref = sc.get("reference", {})
        if "fwd_bwd_ms" in ref:
            lines.append(f"| sequential reference fp32 (batch {ref['batch']}) | | {ref['fwd_bwd_ms']:.1f} | | |")
            lines.append(f"\nshipped kernel's speed-up over the reference (fp32, batch 64): "
                         f"{sc.get('speedup_vs_reference_fp32', float('nan')):.0f}x")
    if result.get("models"):
        lines += ["", "| model | params M | infer img/s | infer GB | train img/s | train GB |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['params_m']:.1f} | {r['infer_img_s']:.0f} | {r['infer_peak_gb']:.1f} | "
                  f"{r['train_img_s']:.0f} | {r['train_peak_gb']:.1f} |" if "error" not in r else
                  f"| {r['model']} | error: {r['error'][:80]} | | | | |" for r in result["models"]]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--infer-batch", type=int, default=128)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--skip", default="", help="comma list of parts to skip: check,scan,models")
    p.add_argument("--configs", default="", help="scan launch configs to sweep, e.g. 4x16x4,4x8x4 "
                                                 "(block_d x chunk x num_warps); default: CONFIGS")
    p.add_argument("--name", default="vim2", help="output file stem")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    skip = set(filter(None, args.skip.split(",")))
    os.makedirs(args.out, exist_ok=True)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=__import__("triton").__version__, started=time.strftime("%Y-%m-%d %H:%M:%S"))
    path = os.path.join(args.out, f"{args.name}.json")
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",") if c] or CONFIGS

    def save():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, path)
        tmp = os.path.join(args.out, f"{args.name}.md.tmp")
        with open(tmp, "w") as f:
            f.write(table(result) + "\n")
        os.replace(tmp, os.path.join(args.out, f"{args.name}.md"))

    for part, fn in (("check", lambda: check(device)), ("scan", lambda: bench_scan(device, copy_bandwidth(device), configs))):
        if part in skip:
            continue
        try:
            result[part] = fn()
        except Exception as e:  # keep going: the other parts' numbers still count
            result[f"{part}_error"] = repr(e)[:1000]
            print(part, "failed:", repr(e)[:1000], flush=True)
        save()
    if "models" not in skip:
        result["models"] = []
        for name in MODELS:
            try:
                result["models"].append(bench_model(name, args.infer_batch, args.train_batch, device))
                torch.cuda.empty_cache()
            except Exception as e:  # one model failing must not lose the others' numbers
                result["models"].append(dict(model=name, error=repr(e)[:400]))
                print("model", name, "failed:", repr(e)[:400], flush=True)
            save()
    print(table(result))


if __name__ == "__main__":
    main()
