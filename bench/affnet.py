"""Does the fused AFF filter make AFFNet faster and leaner than the official fp32 filter?

One GPU run: (1) the filter kernel against its reference at the network's real shapes (fp32 and
bf16 operands, forward and backward); (2) the filter alone, kernel vs fp32 reference; (3) the
whole model under bf16 autocast: the official behaviour (reference filter forced to fp32) vs
ours eager (fused kernel, filter in bf16) vs ours compiled, inference at ``--infer-batch`` and a
training step (forward, backward, SGD) at ``--train-batch``, with peak memory. Writes JSON and a
Markdown table under ``--out`` (default ``$OUT`` or ``bench/results``).

    python -m metazoo.bench.affnet            # or: python bench/affnet.py
"""
from __future__ import annotations

import argparse
import json
import os
import time

import timm
import torch

import metazoo  # noqa: F401  (registers the models)
from metazoo.kernels import use_backend
from metazoo.kernels.aff_filter import aff_filter
from metazoo.mixers.aff import AFFMixer
from _timing import median_ms, rel_err


def _filter_shapes(model_name: str, batch: int, size: int):
    """(B, C, H, W) of every distinct AFF mixer input of the model at ``size``."""
    shapes = []
    with torch.device("meta"):
        model = timm.create_model(model_name)
        for m in model.modules():
            if isinstance(m, AFFMixer):
                m.register_forward_pre_hook(lambda m, a: shapes.append((batch, *a[0].shape[1:])))
        with torch.no_grad():
            model(torch.empty(1, 3, size, size))
    return list(dict.fromkeys(shapes))


def check_kernel(shapes, device, fp32_shapes: int = 1) -> list[dict]:
    """Kernel vs fp32 reference (and the bf16 reference's own error, the bf16 rounding level).

    The fp32-operand kernel (exact FMA, slow to compile) is checked on the first ``fp32_shapes``.
    """
    rows = []
    for i, (B, C, H, W) in enumerate(shapes):
        nb, bs = 8, C // 8
        x = torch.randn(B, C, H, W // 2 + 1, 2, device=device, requires_grad=True)
        ws = [(0.1 * torch.randn(s, device=device)).requires_grad_()
              for s in [(2, nb, bs, bs), (2, nb, bs), (2, nb, bs, bs), (2, nb, bs)]]
        g = torch.randn_like(x)
        res = {}
        runs = [("ref32", None, "torch"), ("ref16", torch.bfloat16, "torch"), ("ker16", torch.bfloat16, "triton")]
        if i < fp32_shapes:
            runs.append(("ker32", None, "triton"))
        for key, cd, be in runs:
            y = aff_filter(x, *ws, 0.01, cd, backend=be)
            res[key] = (y, *torch.autograd.grad(y, [x, *ws], g))
        names = ("y", "dx", "dw1", "db1", "dw2", "db2")
        row = dict(shape=[B, C, H, W])
        for key, *_ in runs[1:]:
            row[key] = {n: rel_err(a, b) for n, a, b in zip(names, res[key], res["ref32"])}
        row["finite"] = all(bool(torch.isfinite(t).all()) for v in res.values() for t in v)
        rows.append(row)
        print(f"check {B}x{C}x{H}x{W}: max rel err vs fp32 ref: "
              + ", ".join(f"{k} {max(v.values()):.2e}" for k, v in row.items() if isinstance(v, dict)), flush=True)
    return rows


def bench_filter(shape, device, warmup: int, iters: int) -> dict:
    """The filter alone, forward + backward: fused kernel (bf16 operands) vs the fp32 reference."""
    B, C, H, W = shape
    nb, bs = 8, C // 8
    x = torch.randn(B, C, H, W // 2 + 1, 2, device=device, requires_grad=True)
    ws = [(0.02 * torch.randn(s, device=device)).requires_grad_()
          for s in [(2, nb, bs, bs), (2, nb, bs), (2, nb, bs, bs), (2, nb, bs)]]
    g = torch.randn_like(x)
    out = dict(shape=list(shape))
    for key, cd, be in [("ref_fp32", None, "torch"), ("kernel_bf16", torch.bfloat16, "triton")]:
        def step():
            y = aff_filter(x, *ws, 0.01, cd, backend=be)
            torch.autograd.backward(y, g)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out[key] = dict(ms=median_ms(step, warmup, iters), peak_mb=(torch.cuda.max_memory_allocated() - base) / 2**20)
    print(f"filter {shape}: " + ", ".join(f"{k} {v['ms']:.2f} ms" for k, v in out.items() if k != "shape"), flush=True)
    return out


def _variant(model_name: str, mode: str, device):
    """``official``: reference filter in fp32; ``eager``/``compiled``: fused kernel in the autocast dtype."""
    model = timm.create_model(model_name, filter_dtype=torch.float32 if mode == "official" else None).to(device)
    backend = "torch" if mode == "official" else "auto"
    run = torch.compile(model) if mode == "compiled" else model
    return model, run, backend


def bench_model(model_name: str, mode: str, args, device) -> dict:
    model, run, backend = _variant(model_name, mode, device)
    res = dict(mode=mode)
    size = args.size
    with use_backend(backend):
        model.eval()
        xi = torch.randn(args.infer_batch, 3, size, size, device=device)

        def infer():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                run(xi)
        t0 = time.time()
        infer()
        torch.cuda.synchronize()
        res["infer_first_call_s"] = time.time() - t0
        ms = median_ms(infer, args.warmup, args.iters)
        res["infer_ms"], res["infer_img_s"] = ms, args.infer_batch * 1000 / ms

        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        xt = torch.randn(args.train_batch, 3, size, size, device=device)
        yt = torch.randint(0, 1000, (args.train_batch,), device=device)

        def train():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(run(xt), yt)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        t0 = time.time()
        train()
        torch.cuda.synchronize()
        res["train_first_call_s"] = time.time() - t0
        torch.cuda.reset_peak_memory_stats()
        ms = median_ms(train, args.warmup, args.iters)
        res["train_ms"], res["train_img_s"] = ms, args.train_batch * 1000 / ms
        res["train_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"{model_name} {mode}: infer {res['infer_img_s']:.0f} img/s, train {res['train_img_s']:.0f} img/s, "
          f"train peak {res['train_peak_gb']:.2f} GB", flush=True)
    return res


def _table(result: dict) -> str:
    rows = ["| model | mode | infer img/s | x official | train img/s | x official | train peak GB |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, modes in result["models"].items():
        base = modes.get("official")
        for mode, r in modes.items():
            fi = r["infer_img_s"] / base["infer_img_s"] if base else float("nan")
            ft = r["train_img_s"] / base["train_img_s"] if base else float("nan")
            rows.append(f"| {name} | {mode} | {r['infer_img_s']:.0f} | {fi:.2f} | {r['train_img_s']:.0f} | "
                        f"{ft:.2f} | {r['train_peak_gb']:.2f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mz_affnet"])
    p.add_argument("--modes", nargs="+", default=["official", "eager", "compiled"])
    p.add_argument("--infer-batch", type=int, default=256)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/affnet.py needs a CUDA device")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "affnet.json")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, args=vars(args),
                  check=[], filter=[], models={})

    def save():
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)

    shapes = _filter_shapes(args.models[0], args.train_batch, args.size)
    result["check"] = check_kernel(shapes, device)
    result["filter"] = [bench_filter(s, device, args.warmup, args.iters) for s in shapes]
    save()
    for name in args.models:
        result["models"][name] = {}
        for mode in args.modes:
            try:
                result["models"][name][mode] = bench_model(name, mode, args, device)
                torch.cuda.empty_cache()
            except Exception as e:  # keep the other rows (a compile failure must not lose them)
                result.setdefault("errors", {})[f"{name}/{mode}"] = repr(e)
                print(f"{name} {mode} FAILED: {e!r}", flush=True)
            save()
    table = _table(result)
    with open(os.path.join(args.out, "affnet.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
