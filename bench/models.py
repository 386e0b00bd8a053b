"""Model benchmark: metazoo (eager with Triton kernels, and torch.compile) vs timm (eager, torch.compile),
or vs the official sail-sg code (``--official-dir``) for IdentityFormer/RandFormer, which timm lacks.

Inference img/s at batch 256 and training-step img/s at batch 128 (AdamW, cross-entropy), peak
training memory, bf16 autocast, channels_last inputs and weights. Before timing, our model is loaded
with timm's (or the official model's, converted) weights and its outputs are compared. RIFormer also
runs in its deploy form (``ours_deploy_*``: ``reparameterize()``, no token mixer). Writes JSON and a
Markdown table under ``--out``; ``--combine`` merges JSON files of several runs into one table.

    python bench/models.py --impls ours_eager,timm_eager --out $OUT
    python bench/models.py --models identityformer_s12,randformer_s12,riformer_s12 \
        --impls ours_eager,ours_compile,ours_deploy_eager,ours_deploy_compile,official_eager \
        --official-dir /path/to/sail-sg/metaformer --check --out $OUT
    python bench/models.py --profile timm_eager --out $OUT   # torch.profiler table of train steps
    python bench/models.py --combine a.json b.json --out bench/results
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

MODELS = {  # timm name -> ours
    "poolformer_s12": "mz_poolformer_s12",
    "convformer_s18": "mz_convformer_s18",
    "caformer_s18": "mz_caformer_s18",
    "mambaout_tiny": "mz_mambaout_tiny",
}
OFFICIAL = {"identityformer_s12": "mz_identityformer_s12", "randformer_s12": "mz_randformer_s12"}  # sail-sg names
DEPLOY = {"riformer_s12": "mz_riformer_s12"}  # re-parameterisable: also timed in the deploy form
OURS = {**MODELS, **OFFICIAL, **DEPLOY}
IMPLS = ("ours_eager", "ours_compile", "timm_eager", "timm_compile", "official_eager", "official_compile",
         "ours_deploy_eager", "ours_deploy_compile")
_official = None  # the imported official metaformer_baselines module (--official-dir)


def load_official(official_dir: str) -> None:
    """Import sail-sg's ``metaformer_baselines.py`` from a read-only copy, without letting its
    ``register_model`` overwrite timm's own poolformerv2/convformer/caformer entries."""
    global _official
    import timm.layers
    import timm.models.registry as registry

    helpers = types.ModuleType("timm.models.layers.helpers")  # an import path timm 1.0 no longer has
    helpers.to_2tuple = timm.layers.to_2tuple
    sys.modules.setdefault("timm.models.layers.helpers", helpers)
    register = registry.register_model
    registry.register_model = lambda fn: fn
    sys.path.insert(0, official_dir)
    try:
        import metaformer_baselines
    finally:
        registry.register_model = register
        sys.path.remove(official_dir)
    _official = metaformer_baselines


def applicable(name: str, impl: str) -> bool:
    """timm rows only where timm has the model, official rows where the official code is loaded."""
    if impl.startswith("timm"):
        return name in MODELS
    if impl.startswith("official"):
        return name in OFFICIAL and _official is not None
    if impl.startswith("ours_deploy"):
        return name in DEPLOY
    return True


def build(name: str, impl: str) -> torch.nn.Module:
    import timm

    import metazoo  # noqa: F401  (registers mz_* models)

    if impl.startswith("official"):
        model = getattr(_official, name)(num_classes=1000)
    else:
        model = timm.create_model(OURS[name] if impl.startswith("ours") else name, num_classes=1000)
        if impl.startswith("ours_deploy"):
            model.reparameterize()
    return model.cuda().to(memory_format=torch.channels_last)


def _sync_time(fn, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def bench_inference(model, batch: int, warmup: int, iters: int) -> float:
    model.eval()
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)

    def step():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    return batch * iters / _sync_time(step, iters)


def make_train_step(model, batch: int, size: int = 224):
    """One AdamW training step (bf16 autocast, cross-entropy) on a fixed channels_last batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def bench_train(model, batch: int, warmup: int, iters: int) -> tuple[float, float]:
    model.train()
    step = make_train_step(model, batch)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ips = batch * iters / _sync_time(step, iters)
    return ips, torch.cuda.max_memory_allocated() / 2 ** 30


def check_against_timm(name: str, batch: int = 8) -> dict:
    """Load timm's weights into ours; relative error of logits and parameter gradients, in fp32 (TF32 off:
    tight) and under bf16 autocast (as benchmarked)."""
    ours, ref = build(name, "ours_eager"), build(name, "timm_eager")
    load = ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    res = dict(load=str(load))
    defaults = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    for mode in ("fp32", "bf16"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode != "fp32"
        out = {}
        for tag, m in (("ours", ours), ("timm", ref)):
            m.train()
            m.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "bf16"):
                logits = m(x)
            F.cross_entropy(logits.float(), y).backward()
            out[tag] = (logits.float(), {k: p.grad.float() for k, p in m.named_parameters() if p.grad is not None})
        g_ours, g_timm = out["ours"][1], out["timm"][1]
        errs = {k: rel(g_ours[k], g_timm[k]) for k in g_timm if k in g_ours and g_timm[k].norm() > 0}
        worst = max(errs, key=errs.get)
        res[mode] = dict(logits_rel_err=rel(out["ours"][0], out["timm"][0]),
                         grad_rel_err_median=sorted(errs.values())[len(errs) // 2], grad_rel_err_max=errs[worst],
                         grad_rel_err_max_param=worst, params_without_grad=sorted(set(g_timm) - set(g_ours)))
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = defaults
    return res


def check_against_official(name: str, batch: int = 8) -> dict:
    """The official model's state dict, converted on load into ours: fp32 logits relative error (TF32 off),
    and for RIFormer-style models the deploy form against the training form."""
    from metazoo.backbones import _metaformer_baselines as baselines

    defaults = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    res = {}
    with torch.no_grad():
        if name in OFFICIAL and _official is not None:
            ref, ours = build(name, "official_eager").eval(), build(name, "ours_eager").eval()
            ours.load_state_dict(baselines.checkpoint_filter_fn(ref.state_dict(), ours), strict=True)
            want = ref(x)
            res["logits_rel_err_vs_official_fp32"] = ((ours(x) - want).norm() / want.norm()).item()
        if name in DEPLOY:
            ours = build(name, "ours_eager").eval()
            want = ours(x)
            got = ours.reparameterize()(x)
            res["deploy_vs_training_rel_err_fp32"] = ((got - want).norm() / want.norm()).item()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = defaults
    return res


def run_one(name: str, impl: str, args) -> dict:
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = build(name, impl)
    t0 = time.time()
    if impl.endswith("compile"):
        model = torch.compile(model)
    row = dict(model=name, impl=impl)
    row["infer_img_s"] = bench_inference(model, args.infer_batch, args.warmup, args.iters)
    row["train_img_s"], row["train_peak_gib"] = bench_train(model, args.train_batch, args.warmup, args.iters)
    row["wall_s"] = time.time() - t0
    del model
    return row


def profile(out_dir: str, names, impl: str) -> None:
    """torch.profiler table (top CUDA-time ops) of one bf16 channels_last training step per model."""
    from torch.profiler import ProfilerActivity, profile

    with open(os.path.join(out_dir, f"profile_{impl}.txt"), "w") as f:
        for name in names:
            model = build(name, impl).train()
            step = make_train_step(model, 128)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
            f.write(f"### {name} ({impl}): one training step, batch 128, bf16 autocast, channels_last\n{table}\n\n")
            print(f"### {name}\n{table}", flush=True)
            del model, step


def markdown(rows: list[dict], checks: dict) -> str:
    by = {(r["model"], r["impl"]): r for r in rows}
    lines = ["| model | impl | infer img/s (b256) | train img/s (b128) | train peak GiB | infer vs anchor compiled | "
             "train vs anchor compiled | mem vs anchor eager |", "|---|---|---|---|---|---|---|---|"]
    for name in OURS:
        anchor = "official" if name in OFFICIAL else "timm"  # RIFormer: no anchor row
        tc, te = by.get((name, f"{anchor}_compile")), by.get((name, f"{anchor}_eager"))
        for impl in IMPLS:
            r = by.get((name, impl))
            if r is None:
                continue
            ri = f"{r['infer_img_s'] / tc['infer_img_s']:.2f}x" if tc else "-"
            rt = f"{r['train_img_s'] / tc['train_img_s']:.2f}x" if tc else "-"
            rm = f"{r['train_peak_gib'] / te['train_peak_gib']:.2f}x" if te else "-"
            lines.append(f"| {name} | {impl} | {r['infer_img_s']:.0f} | {r['train_img_s']:.0f} | "
                         f"{r['train_peak_gib']:.2f} | {ri} | {rt} | {rm} |")
    if checks:
        lines += ["", "| model | mode | logits rel err vs timm | grad rel err median / max (param) |", "|---|---|---|---|"]
        for name, c in checks.items():
            for key, v in c.items():
                if key.endswith("_fp32"):  # official / deploy-form checks
                    lines.append(f"| {name} | fp32 | {key}: {v:.1e} | - |")
            for mode in ("fp32", "bf16"):
                m = c.get(mode)
                if m:
                    lines.append(f"| {name} | {mode} | {m['logits_rel_err']:.1e} | {m['grad_rel_err_median']:.1e} / "
                                 f"{m['grad_rel_err_max']:.1e} ({m['grad_rel_err_max_param']}) |")
    return "\n".join(lines) + "\n"


def write(out_dir: str, rows, checks, meta, stem="models"):
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows, checks=checks), f, indent=1)
    md = markdown(rows, checks)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(md)
    return md


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--models", default=",".join(MODELS), help=f"accepted: {', '.join(OURS)}")
    ap.add_argument("--official-dir", default=None,
                    help="folder holding sail-sg's metaformer_baselines.py (official_* rows for IdentityFormer/RandFormer)")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--infer-batch", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--profile", default="", help="only write torch.profiler tables of this impl (timm_eager, ours_eager)")
    ap.add_argument("--check", action="store_true", help="compare ours with timm (same weights) first")
    ap.add_argument("--combine", nargs="*", help="merge these JSON results into one table")
    ap.add_argument("--stem", default="models")
    args = ap.parse_args()
    names = [n for n in args.models.split(",") if n]
    unknown = set(names) - set(OURS)
    if unknown:
        raise ValueError(f"--models: unknown {sorted(unknown)}; accepted: {', '.join(OURS)}")
    if args.official_dir is not None:
        if not os.path.isfile(os.path.join(args.official_dir, "metaformer_baselines.py")):
            raise ValueError(f"--official-dir={args.official_dir!r} holds no metaformer_baselines.py; accepted: "
                             "a copy of github.com/sail-sg/metaformer")
        load_official(args.official_dir)
    impls = [i for i in args.impls.split(",") if i]
    if set(impls) - set(IMPLS):
        raise ValueError(f"--impls: unknown {sorted(set(impls) - set(IMPLS))}; accepted: {', '.join(IMPLS)}")
    os.makedirs(args.out, exist_ok=True)
    if args.combine:
        rows, checks, metas = [], {}, []
        for path in args.combine:
            with open(path) as f:
                d = json.load(f)
            rows += d["rows"]
            checks.update(d.get("checks", {}))
            metas.append(d["meta"])
        print(write(args.out, rows, checks, dict(runs=metas), args.stem))
        return
    torch.backends.cudnn.benchmark = True
    if args.profile:
        profile(args.out, names, args.profile)
        return
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                infer_batch=args.infer_batch, train_batch=args.train_batch, iters=args.iters, warmup=args.warmup,
                dtype="bf16 autocast", memory_format="channels_last", kernels=os.environ.get("METAZOO_KERNELS", "auto"))
    checks = {}
    if args.check:
        for name in names:
            checks[name] = check_against_timm(name) if name in MODELS else check_against_official(name)
            print(name, json.dumps(checks[name]), flush=True)
    rows = []
    for name in names:
        for impl in impls:
            if not applicable(name, impl):
                print(f"skip {name} {impl}: no such implementation here", flush=True)
                continue
            row = run_one(name, impl, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(args.out, rows, checks, meta, args.stem)
    print(write(args.out, rows, checks, meta, args.stem))


if __name__ == "__main__":
    main()
