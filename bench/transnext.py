"""How fast and how lean is our TransNeXt on one GPU, against its unfused reference and the official code?

One script, one device call: (1) the fused aggregated-attention kernel against its reference at the
real shapes (fp32 and bf16, forward and backward), (2) model outputs of the kernel and reference
paths, (3) img/s and peak memory under bf16 autocast for inference (batch 256) and a training step
(fused AdamW, batch 128, the same for every path): ours eager, ours compiled (``--compile-mode``,
default reduce-overhead, i.e. CUDA graphs), the unfused reference path and, when a read-only copy
of the official code is given with ``--official-dir``, the official native path. Writes JSON and
prints a Markdown table.

    python -m metazoo.bench.transnext --out $OUT/transnext.json [--official-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

import torch
import torch.nn.functional as F
from _timing import rel_err

# figures quoted in the issue for the official native path on an H100 (bf16, same batches)
OFFICIAL_QUOTED = {"micro": dict(infer=1253.0, train=404.0, train_mem_gib=18.0),
                   "tiny": dict(infer=890.0, train=280.0, train_mem_gib=26.9)}


T0 = time.time()


def check_kernel(results):
    """Kernel vs reference at stage shapes of micro/tiny at 224 and small at 384 (P=144)."""
    from metazoo.kernels.aggregated_attention import aggregated_attention, aggregated_attention_ref
    cases = {"micro_s1": (8, 56, 56, 48, 2, 49), "micro_s3": (32, 14, 14, 192, 8, 49),
             "small384_s1": (2, 96, 96, 72, 3, 144)}
    out = {}
    for name, (B, H, W, C, h, P) in cases.items():
        for dtype in (torch.float32, torch.bfloat16):
            N, D = H * W, C // h
            args = [torch.randn(B, N, C, device="cuda", dtype=dtype), torch.randn(B, N, 2 * C, device="cuda", dtype=dtype),
                    torch.randn(B, P, 2 * C, device="cuda", dtype=dtype), 0.02 * torch.randn(h, D, device="cuda"),
                    torch.randn(h, device="cuda"), 1e-3 * torch.randn(h, 9, device="cuda"),
                    torch.randn(h, N, P, device="cuda"), 0.02 * torch.randn(h, D, 9, device="cuda"),
                    0.02 * torch.randn(h, 9, device="cuda")]
            args = [a.requires_grad_() for a in args]
            o = aggregated_attention(*args, H, W, h, backend="triton")
            g = torch.randn_like(o)
            grads = torch.autograd.grad(o, args, g)
            ref_args = [a.detach().double().requires_grad_() for a in args]
            r = aggregated_attention_ref(*ref_args, H, W, h)
            rgrads = torch.autograd.grad(r, ref_args, g.double())
            errs = {"out": rel_err(o, r)}
            for n, a, b in zip(["q", "kv", "kv_pool", "qe", "temp", "lb", "pb", "tok", "tb"], grads, rgrads):
                errs[n] = rel_err(a, b)
            out[f"{name}_{str(dtype).split('.')[-1]}"] = errs
            print(name, dtype, "max rel err", f"{max(errs.values()):.2e}", f"t={time.time() - T0:.0f}s", flush=True)
    results["kernel_rel_err"] = out


def make_model(name, official: bool = False):
    if official:  # the official entry points reject timm's create_model keywords: call them directly
        import transnext
        return getattr(transnext, f"transnext_{name}")()
    import metazoo  # noqa: F401
    import timm
    return timm.create_model(f"mz_transnext_{name}")


def load_official(official_dir):
    """Import the official classification code from a read-only copy (CPU-free path: native attention)."""
    if "pkg_resources" not in sys.modules:  # the official file imports it only to probe for swattention
        stub = types.ModuleType("pkg_resources")

        class DistributionNotFound(Exception):
            pass

        def get_distribution(name):
            raise DistributionNotFound(name)
        stub.DistributionNotFound, stub.get_distribution = DistributionNotFound, get_distribution
        sys.modules["pkg_resources"] = stub
    sys.path.insert(0, official_dir)
    import transnext  # noqa: F401  (registers transnext_* with timm)


def check_official_equivalence():
    """Official model -> its state dict -> ours (strict): output rel err at the construction size."""
    import timm
    import transnext
    from metazoo.kernels import use_backend
    out = {}
    for name, size, pretrain in (("micro", 224, 224), ("micro", 384, 224)):
        torch.manual_seed(0)
        official = getattr(transnext, f"transnext_{name}")(img_size=size, pretrain_size=pretrain).cuda().eval()
        with torch.no_grad():
            for p in official.parameters():  # move biases, temperatures, position MLPs off their init
                p.add_(0.02 * torch.randn_like(p))
        ours = timm.create_model(f"mz_transnext_{name.lower()}", img_size=size, pretrain_size=pretrain).cuda().eval()
        ours.load_state_dict(official.state_dict(), strict=True)
        x = torch.randn(2, 3, size, size, device="cuda")
        with torch.no_grad():
            ref = official(x)
            for backend in ("triton", "torch"):
                with use_backend(backend):
                    out[f"{name}_{size}_{backend}"] = rel_err(ours(x), ref)
        del official, ours
    return out


def bench(model, mode, batch, steps, warmup, compile_mode):
    """img/s and peak memory of inference or a training step (AdamW, fused: its foreach form costs
    ~60 ms of host time per step for TransNeXt's 617 parameter tensors); ``compile_mode`` None = eager."""
    model = model.cuda()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    fn = model if compile_mode is None else torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
    if mode == "infer":
        model.eval()

        def step():
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                fn(x)
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            with torch.autocast("cuda", torch.bfloat16):
                loss = F.cross_entropy(fn(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i in range(steps):
        step()
        events[i + 1].record()
    torch.cuda.synchronize()
    # median step: a late Triton specialisation compiled inside the loop must not skew the figure
    per_step = sorted(a.elapsed_time(b) for a, b in zip(events, events[1:]))
    ms = per_step[len(per_step) // 2]
    return dict(img_s=batch * 1000.0 / ms, ms_per_step=ms, max_step_ms=per_step[-1],
                peak_mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30)


def profile_train_step(results, batch):
    """Top CUDA kernels of one eager training step of ours (micro), to see where time goes."""
    import timm
    from metazoo.kernels import use_backend
    model = timm.create_model("mz_transnext_micro").cuda().train()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            F.cross_entropy(model(x), y).backward()
    with use_backend("triton"):
        step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    results["profile_micro_train_step"] = table
    print(table, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", nargs="+", default=["micro", "tiny"])
    ap.add_argument("--infer-batch", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--official-dir", default=None)
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip remaining runs after this many seconds")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-mode", default="reduce-overhead", choices=["default", "reduce-overhead", "max-autotune"],
                    help="torch.compile mode of the ours_compiled path (reduce-overhead: CUDA graphs)")
    ap.add_argument("--paths", nargs="+", choices=["ours_eager", "official_native", "ours_compiled", "reference_eager"],
                    help="measure only these paths (default: all)")
    ap.add_argument("--no-check", action="store_true",
                    help="skip the kernel checks, keeping the checks and runs already in --out (throughput re-runs)")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of one training step")
    args = ap.parse_args()
    t0 = T0
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks in true fp32 (benchmarks run under bf16 autocast)
    torch.backends.cudnn.allow_tf32 = False
    from metazoo.kernels import use_backend
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, official_quoted=OFFICIAL_QUOTED,
                   infer_batch=args.infer_batch, train_batch=args.train_batch, compile_mode=args.compile_mode,
                   optimizer="AdamW(fused=True), every path", runs={})

    def save():
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.out)

    import metazoo  # noqa: F401
    import timm
    if args.no_check:
        if not os.path.exists(args.out):
            raise ValueError(f"--no-check keeps the checks of an earlier run: --out {args.out} does not exist")
        with open(args.out) as f:
            earlier = json.load(f)
        # keep the earlier checks and runs: each model's ratios stay within the call that measured it
        results.update({k: v for k, v in earlier.items() if k not in ("device", "torch")})
    else:
        check_kernel(results)
    with torch.no_grad():
        model = timm.create_model("mz_transnext_micro").cuda().eval()
        x = torch.randn(4, 3, 224, 224, device="cuda")
        with use_backend("torch"):
            ref = model(x)
        with use_backend("triton"):
            out = model(x)
            odd = model(torch.randn(2, 3, 97, 131, device="cuda"))
        results["model_rel_err_fp32"] = rel_err(out, ref)
        print("model checked", f"t={time.time() - T0:.0f}s", flush=True)
        results["model_odd_size_finite"] = bool(torch.isfinite(odd).all())
    save()
    print("model kernel-vs-reference rel err", results["model_rel_err_fp32"], flush=True)

    if args.profile:
        profile_train_step(results, args.train_batch)
        save()
    if args.official_dir:
        load_official(args.official_dir)
        results["official_equivalence"] = check_official_equivalence()
        save()
        print("ours vs official (strict load of the official state dict)", results["official_equivalence"], flush=True)
    plan = []  # most informative first: the time budget may cut the tail
    for name in args.models:
        plan.append((name, "ours_eager", "triton", False))
        if args.official_dir:
            plan.append((name, "official_native", None, False))
    if not args.no_compile:
        plan.append((args.models[0], "ours_compiled", "triton", True))
    plan += [(name, "reference_eager", "torch", False) for name in args.models]
    if not args.no_compile:
        plan += [(name, "ours_compiled", "triton", True) for name in args.models[1:]]
    if args.paths:
        plan = [entry for entry in plan if entry[1] in args.paths]
    for name, label, backend, compiled in plan:
        for mode, batch in (("infer", args.infer_batch), ("train", args.train_batch)):
            key = f"{name}/{label}/{mode}"
            if time.time() - t0 > args.budget_s:
                results["runs"][key] = dict(skipped="time budget")
                continue
            torch.manual_seed(0)
            model = make_model(name, official=label == "official_native")
            try:
                with use_backend(backend or "torch"):
                    r = bench(model, mode, batch, args.steps, 3, args.compile_mode if compiled else None)
            except torch.cuda.OutOfMemoryError as e:
                r = dict(error=f"OOM: {str(e)[:120]}")
            del model
            torch.cuda.empty_cache()
            torch._dynamo.reset()
            results["runs"][key] = r
            save()
            print(key, r, f"t={time.time() - t0:.0f}s", flush=True)

    print("\n| model | path | infer img/s | train img/s | train peak GiB | x official infer | x official train | mem / official |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        q = OFFICIAL_QUOTED[name]
        labels = sorted({k.split("/")[1] for k in results["runs"] if k.startswith(name + "/")})
        for label in labels:
            i = results["runs"].get(f"{name}/{label}/infer", {})
            t = results["runs"].get(f"{name}/{label}/train", {})
            if "img_s" not in i or "img_s" not in t:
                print(f"| {name} | {label} | {i} | {t} | | | | |")
                continue
            print(f"| {name} | {label} | {i['img_s']:.0f} | {t['img_s']:.0f} | {t['peak_mem_gib']:.2f} | "
                  f"{i['img_s'] / q['infer']:.2f} | {t['img_s'] / q['train']:.2f} | "
                  f"{t['peak_mem_gib'] / q['train_mem_gib']:.2f} |")
    save()


if __name__ == "__main__":
    main()
