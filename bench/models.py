"""Model benchmark: metazoo (eager with Triton kernels, torch.compile, CUDA graphs) vs timm (the same three).

At the family's published recipe drop path (``--drop-path`` overrides), for each model and row:
inference img/s (batch 256) and one training step (batch 128, fused AdamW, cross-entropy) in img/s,
wall ms vs GPU-busy ms per step (torch.profiler: summed device kernel time; the kernels behind it go
to ``<stem>_kernels.txt``), MFU (fwd+bwd model
FLOPs per step over the GPU's bf16 dense peak), peak training memory; bf16 autocast, channels_last
inputs and weights. Rows: timm/ours x eager, torch.compile, torch.compile(mode="reduce-overhead").
``--compile-ops`` runs our compiled rows once per policy of ``kernels.dispatch.COMPILE_OPS`` (custom
ops, inductor's plain PyTorch, or the per-op table; labelled ``ours_compile [inductor]`` etc.).
``--check`` first loads timm's weights into ours and compares logits and gradients (drop path 0:
masks are random). JSON is rewritten after every row, so a cut run keeps what it measured;
``--combine`` merges JSON files of several runs (one model per run keeps a GPU call short).
IdentityFormer/RandFormer and RIFormer, which timm lacks, compare with the official code (``--official-dir``,
repeatable: a folder with sail-sg's ``metaformer_baselines.py``, and/or one with mmpretrain's ``riformer.py``
and ``poolformer.py``, see ``bench/official_mmpretrain.py``); RIFormer also runs in its deploy form
(``ours_deploy_*``: ``reparameterize()``, no token mixer).

    python bench/models.py --models poolformer_s12 --out $OUT
    python bench/models.py --models identityformer_s12,randformer_s12,riformer_s12 \
        --impls ours_eager,ours_compile,ours_deploy_eager,ours_deploy_compile,official_eager \
        --official-dir /path/to/sail-sg/metaformer --official-dir .carry/official_riformer --check --out $OUT
    python bench/models.py --models poolformer_s12 --impls timm_compile,ours_compile,ours_compile_ro \
        --compile-ops custom,inductor,table --out $OUT   # our compiled rows under each COMPILE_OPS policy
    python bench/models.py --profile timm_eager --out $OUT   # torch.profiler table of train steps
    python bench/models.py --combine a.json b.json --out bench/results
    python bench/models.py --device cpu --iters 1 --warmup 1 --infer-batch 2 --train-batch 2 --size 64  # smoke
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from metazoo.kernels.dispatch import COMPILE_ENV_VAR, COMPILE_OPS, COMPILE_POLICIES

MODELS = {  # timm name -> ours
    "poolformer_s12": "mz_poolformer_s12",
    "convformer_s18": "mz_convformer_s18",
    "caformer_s18": "mz_caformer_s18",
    "mambaout_tiny": "mz_mambaout_tiny",
    "caformer_b36": "mz_caformer_b36",
}
SAIL = {"identityformer_s12": "mz_identityformer_s12", "randformer_s12": "mz_randformer_s12"}  # sail-sg names
MMPRETRAIN = {"riformer_s12": "mz_riformer_s12"}  # official code in mmpretrain (bench/official_mmpretrain.py)
OFFICIAL = {**SAIL, **MMPRETRAIN}
DEPLOY = {"riformer_s12": "mz_riformer_s12"}  # re-parameterisable: also timed in the deploy form
OURS = {**MODELS, **OFFICIAL, **DEPLOY}
# drop path of models without a recipe file (sail-sg/metaformer scripts/{identity,rand}former/*_s12.sh)
DROP_PATH = {"identityformer_s12": 0.1, "randformer_s12": 0.1}
TRAIN_BATCH = {"caformer_b36": 64}  # per-model training batch where 128 does not fit timm eager on 80 GB
SPEED_ROWS = ("timm_eager", "timm_compile", "timm_compile_ro", "ours_eager", "ours_compile", "ours_compile_ro")
IMPLS = (*SPEED_ROWS, "official_eager", "official_compile", "ours_deploy_eager", "ours_deploy_compile")
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peak (SXM), by device-name substring
RECIPES = Path(__file__).resolve().parents[1] / "configs" / "recipe"
_official = {}  # name -> builder(drop_path) of the official model, filled by load_official (--official-dir)


def load_official(official_dir: str) -> None:
    """Register the official builders a folder provides: sail-sg's ``metaformer_baselines.py`` and/or
    mmpretrain's ``riformer.py`` + ``poolformer.py``; ``ValueError`` when it holds neither."""
    from metazoo.bench import official_mmpretrain

    sail = os.path.isfile(os.path.join(official_dir, "metaformer_baselines.py"))
    if not sail and not official_mmpretrain.check_folder(official_dir):
        raise ValueError(f"--official-dir={official_dir!r} holds neither metaformer_baselines.py nor "
                         f"{' + '.join(official_mmpretrain.FILES)}; accepted: a copy of github.com/sail-sg/metaformer "
                         "or of mmpretrain/models/backbones/ of github.com/open-mmlab/mmpretrain")
    if sail:
        mod = _load_sail(official_dir)
        for name in SAIL:
            _official[name] = lambda dp, fn=getattr(mod, name): fn(num_classes=1000, drop_path_rate=dp)
    if official_mmpretrain.check_folder(official_dir):
        mod = official_mmpretrain.load(official_dir)
        for name in MMPRETRAIN:
            _official[name] = lambda dp, arch=name.rsplit("_", 1)[1]: official_mmpretrain.riformer(
                mod, arch, drop_path_rate=dp)


def _load_sail(official_dir: str):
    """Import sail-sg's ``metaformer_baselines.py`` from a read-only copy, without letting its
    ``register_model`` overwrite timm's own poolformerv2/convformer/caformer entries."""
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
    return metaformer_baselines


def applicable(name: str, impl: str) -> bool:
    """timm rows only where timm has the model, official rows where the official code is loaded."""
    if impl.startswith("timm"):
        return name in MODELS
    if impl.startswith("official"):
        return name in _official
    if impl.startswith("ours_deploy"):
        return name in DEPLOY
    return True


def recipe_drop_path(name: str) -> float:
    """Drop-path rate of ``mz_<name>`` in ``configs/recipe/<family>.yaml`` (the published training recipe)."""
    import yaml

    if name in DROP_PATH:
        return DROP_PATH[name]
    ours = OURS[name]
    path = RECIPES / f"{ours[3:].rsplit('_', 1)[0]}.yaml"
    per_model = yaml.safe_load(path.read_text()).get("per_model", {}) if path.exists() else {}
    if "drop_path_rate" not in per_model.get(ours, {}):
        raise ValueError(f"--drop-path: no recipe drop path for {ours} in {path}; pass --drop-path")
    return float(per_model[ours]["drop_path_rate"])


def build(name: str, impl: str, drop_path: float, device: str) -> torch.nn.Module:
    import timm

    import metazoo  # noqa: F401  (registers mz_* models)

    if impl.startswith("official"):
        model = _official[name](drop_path)
    else:
        model = timm.create_model(OURS[name] if impl.startswith("ours") else name, num_classes=1000,
                                  drop_path_rate=drop_path)
        if impl.startswith("ours_deploy"):
            model.reparameterize()
    return model.to(device).to(memory_format=torch.channels_last)


def compile_model(model: torch.nn.Module, impl: str, device: str) -> torch.nn.Module:
    """The row's compilation; off CUDA (smoke runs) dynamo traces with the eager backend (no inductor, no graphs)."""
    if impl.endswith("eager"):
        return model
    if device != "cuda":
        return torch.compile(model, backend="eager")
    return torch.compile(model, mode="reduce-overhead" if impl.endswith("_ro") else None)


def _seconds(fn, iters: int, device: str) -> float:
    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _input(batch: int, size: int, device: str) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)


def bench_inference(model, batch: int, size: int, warmup: int, iters: int, device: str) -> float:
    model.eval()
    x = _input(batch, size, device)

    def step():
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            model(x)

    for _ in range(warmup):
        step()
    _sync(device)
    return batch * iters / _seconds(step, iters, device)


def make_train_step(model, batch: int, size: int = 224, device: str = "cuda"):
    """One fused-AdamW training step (bf16 autocast, cross-entropy) on a fixed channels_last batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = _input(batch, size, device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def kernel_kind(name: str) -> str:
    """What a device kernel does, from its name: ``attention`` (flash / fused SDPA), ``matmul`` (cuBLAS,
    CUTLASS, inductor's mm templates), ``conv`` (cuDNN, our depthwise conv) or ``other`` (elementwise,
    norms, reductions, copies). Inductor's fused Triton kernels name the aten ops they absorbed, so only
    its templates count as matmul."""
    n = name.lower()
    if n.startswith("triton_"):
        return "matmul" if n.startswith("triton_tem") else "other"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(k in n for k in ("nhwckrsc", "implicit_gemm", "conv", "dgrad", "wgrad", "fprop")):
        return "conv"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "cublas", "splitk")):
        return "matmul"
    return "other"


def busy_ms(step, steps: int, device: str) -> tuple[float | None, dict, str]:
    """Summed device kernel time per step over ``steps`` profiled steps, the same split by
    :func:`kernel_kind`, and the table of the kernels that took it, largest first (None, {}, "" off CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    if device != "cuda":
        return None, {}, ""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kinds = {}
    for e in events:
        kind = kernel_kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + getattr(e, "self_device_time_total", 0.0) / 1e3 / steps
    table = events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
    return sum(kinds.values()), kinds, f"{steps} steps\n{table}"


def bench_train(model, batch: int, size: int, warmup: int, iters: int, device: str) -> dict:
    model.train()
    step = make_train_step(model, batch, size, device)
    if device == "cuda":  # from the first step: CUDA-graph pools are allocated while the warm-up captures
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    _sync(device)
    sec = _seconds(step, iters, device)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
    busy, kinds, kernels = busy_ms(step, min(iters, 3), device)
    return dict(train_img_s=batch * iters / sec, train_wall_ms=1e3 * sec / iters, train_peak_gib=peak,
                train_gpu_busy_ms=busy, train_gpu_ms_by_kind=kinds, train_kernels=kernels)


def train_flops(name: str, batch: int, size: int) -> int:
    """Model FLOPs of one training forward + backward (timm's model on the meta device; kernel-independent)."""
    from torch.utils.flop_counter import FlopCounterMode

    import timm

    with torch.device("meta"):
        model = timm.create_model(name, num_classes=1000)
        x = torch.randn(batch, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    return counter.get_total_flops()


def peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    dev = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in dev), None)


def check_against_timm(name: str, device: str, size: int, batch: int = 8, drop_path: float = 0.0) -> dict:
    """Load timm's weights into ours; relative error of logits and parameter gradients in train mode, in
    fp32 (TF32 off: tight) and under bf16 autocast (as benchmarked). At ``drop_path`` > 0 both forwards
    start from one seed, so ours (keep vector inside the fused kernels) and timm's DropPath draw the same
    masks."""
    ours, ref = build(name, "ours_eager", drop_path, device), build(name, "timm_eager", drop_path, device)
    load = ours.load_state_dict(ref.state_dict(), strict=True)
    x = _input(batch, size, device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    def flat(grads, keys):
        return torch.cat([grads[k].flatten() for k in keys])

    res = dict(load=str(load), drop_path=drop_path)
    defaults = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    fp32 = None
    for mode in ("fp32", "bf16"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode != "fp32"
        out = {}
        for tag, m in (("ours", ours), ("timm", ref)):
            m.train()
            m.zero_grad(set_to_none=True)
            torch.manual_seed(0)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=mode == "bf16"):
                logits = m(x)
            F.cross_entropy(logits.float(), y).backward()
            out[tag] = (logits.float(), {k: p.grad.float() for k, p in m.named_parameters() if p.grad is not None})
        g_ours, g_timm = out["ours"][1], out["timm"][1]
        errs = {k: rel(g_ours[k], g_timm[k]) for k in g_timm if k in g_ours and g_timm[k].norm() > 0}
        worst = max(errs, key=errs.get)
        common = [k for k in g_timm if k in g_ours]
        res[mode] = dict(logits_rel_err=rel(out["ours"][0], out["timm"][0]),
                         grad_rel_err_all=rel(flat(g_ours, common), flat(g_timm, common)),
                         grad_rel_err_median=sorted(errs.values())[len(errs) // 2], grad_rel_err_max=errs[worst],
                         grad_rel_err_max_param=worst, params_without_grad=sorted(set(g_timm) - set(g_ours)))
        if fp32 is None:
            fp32 = out["timm"]
        else:  # bf16 error of each model against timm's fp32 result: the reference's own bf16 error is the bar
            for tag in ("ours", "timm"):
                res[mode][f"{tag}_vs_timm_fp32"] = dict(
                    logits=rel(out[tag][0], fp32[0]), grads=rel(flat(out[tag][1], common), flat(fp32[1], common)))
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = defaults
    return res


def _perturb(model: torch.nn.Module) -> None:
    """Noise on every parameter (as large as its spread; 0.1 where it is constant, e.g. norms and layer
    scales at init), so a comparison exercises every weight."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            spread = p.float().std().item() if p.numel() > 1 else 0.0
            noise = torch.randn(p.shape, generator=gen) * (spread if spread > 0 else 0.1)
            p.add_(noise.to(p.device, p.dtype))


def _convert(name: str):
    """Our loader of the official checkpoint layout of ``name``."""
    from metazoo.backbones import _metaformer_baselines as baselines
    from metazoo.backbones import riformer

    return riformer.checkpoint_filter_fn if name in MMPRETRAIN else baselines.checkpoint_filter_fn


def check_against_official(name: str, device: str, size: int, batch: int = 8) -> dict:
    """The official model (perturbed weights) and ours with its state dict converted on load: fp32 logits
    relative error (TF32 off); for RIFormer also both deploy forms (mmpretrain's ``switch_to_deploy``, our
    ``reparameterize``) and ours deploy vs training form."""
    defaults = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    x = torch.randn(batch, 3, size, size, device=device)

    def rel(got, want):
        return ((got - want).norm() / want.norm()).item()

    res = {}
    with torch.no_grad():
        if name in _official:
            ref, ours = build(name, "official_eager", 0.0, device).eval(), build(name, "ours_eager", 0.0, device).eval()
            _perturb(ref)
            ours.load_state_dict(_convert(name)(ref.state_dict(), ours), strict=True)
            res["logits_rel_err_vs_official_fp32"] = rel(ours(x), ref(x))
            if name in MMPRETRAIN:
                ref.backbone.switch_to_deploy()
                res["deploy_logits_rel_err_vs_official_deploy_fp32"] = rel(ours.reparameterize()(x), ref(x))
        if name in DEPLOY:
            ours = build(name, "ours_eager", 0.0, device).eval()
            want = ours(x)
            res["deploy_vs_training_rel_err_fp32"] = rel(ours.reparameterize()(x), want)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = defaults
    return res


def compile_policies(impl: str, policies: list[str]) -> list[str | None]:
    """The ``COMPILE_OPS`` policies a row runs under: ours compiled rows each of ``policies``, others none."""
    return list(policies) if impl.startswith("ours") and not impl.endswith("eager") else [None]


def run_one(name: str, impl: str, args, drop_path: float, flops: int, policy: str | None = None) -> dict:
    """One row; ``policy`` (``kernels.dispatch.compile_ops``) is active while the model is traced."""
    from metazoo.kernels.dispatch import compile_ops

    if args.device == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # a compiled graph keeps the policy it was traced with: trace every row afresh
    torch.manual_seed(0)
    t0 = time.time()
    model = compile_model(build(name, impl, drop_path, args.device), impl, args.device)
    batch = args.train_batch or TRAIN_BATCH.get(name, 128)
    row = dict(model=name, impl=impl, drop_path=drop_path, infer_batch=args.infer_batch, train_batch=batch,
               compile_ops=policy)
    with compile_ops(policy) if policy else contextlib.nullcontext():
        row["infer_img_s"] = bench_inference(model, args.infer_batch, args.size, args.warmup, args.iters, args.device)
        row.update(bench_train(model, batch, args.size, args.warmup, args.iters, args.device))
    peak = peak_tflops(args.device)
    row["train_flops_per_step"] = flops * batch
    row["train_mfu"] = flops * batch / (row["train_wall_ms"] * 1e-3) / (peak * 1e12) if peak else None
    row["wall_s"] = time.time() - t0
    del model
    return row


def profile(out_dir: str, names, impl: str, args) -> None:
    """torch.profiler table (top device-time ops) of one bf16 channels_last training step per model."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with open(os.path.join(out_dir, f"profile_{impl}.txt"), "w") as f:
        for name in names:
            drop_path = recipe_drop_path(name) if args.drop_path is None else args.drop_path
            batch = args.train_batch or TRAIN_BATCH.get(name, 128)
            model = build(name, impl, drop_path, args.device).train()
            step = make_train_step(model, batch, args.size, args.device)
            for _ in range(3):
                step()
            _sync(args.device)
            with profile(activities=acts) as prof:
                step()
                _sync(args.device)
            key = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
            table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)
            f.write(f"### {name} ({impl}, drop path {drop_path}): one training step, batch {batch}, bf16 autocast, "
                    f"channels_last\n{table}\n\n")
            print(f"### {name}\n{table}", flush=True)
            del model, step


def _x(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _vs_fp32(m: dict) -> str:
    """A bf16 check's error against timm's fp32 result, ours then timm's own (the bar); '-' in fp32."""
    o, t = m.get("ours_vs_timm_fp32"), m.get("timm_vs_timm_fp32")
    return f"{o['logits']:.1e} / {o['grads']:.1e}, {t['logits']:.1e} / {t['grads']:.1e}" if o and t else "-"


def _groups(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """Rows by (model, run): ratios only ever compare rows of one run (``--combine`` tags each row's run)."""
    out: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        out.setdefault((r["model"], r.get("run", 0)), []).append(r)
    return out


def _labels(groups) -> dict[tuple[str, int], str]:
    """A model's name, plus its run where several runs measured it."""
    runs_of = {}
    for name, run in groups:
        runs_of.setdefault(name, []).append(run)
    return {(name, run): name + (f", run {run + 1}" if len(runs_of[name]) > 1 else "") for name, run in groups}


def floor_lines(rows: list[dict]) -> list[str]:
    """Per model and run, the GPU time of its matmul and attention kernels (cuBLAS / SDPA, the same calls in
    every row; least over the rows) and what it bounds: no fusion of the other kernels can make a training
    step faster than timm's best row by more than timm's best wall time over that floor."""
    lines = []
    groups = _groups(rows)
    labels = _labels(groups)
    for key, group in groups.items():
        mine = [r for r in group if r.get("train_gpu_ms_by_kind")]
        timm = [r for r in mine if r["impl"].startswith("timm")]
        if not mine or not timm:
            continue
        floor = min(r["train_gpu_ms_by_kind"].get("matmul", 0.0) + r["train_gpu_ms_by_kind"].get("attention", 0.0)
                    for r in mine)
        best = max(timm, key=lambda r: r["train_img_s"])
        if not floor:
            lines.append(f"| {labels[key]} | 0 | - | - |")
            continue
        lines.append(f"| {labels[key]} | {floor:.1f} | {best['impl']} {best['train_wall_ms']:.1f} | "
                     f"{best['train_wall_ms'] / floor:.2f}x |")
    head = ["", "| model | matmul + attention GPU ms per training step (least over rows) | timm's best training "
            "wall ms | ceiling vs timm's best (every other kernel free) |", "|---|---|---|---|"]
    return head + lines if lines else []


def _ratio(r: dict, base: dict | None, key: str) -> str:
    return f"{r[key] / base[key]:.2f}x" if base and r.get(key) and base.get(key) else "-"


def markdown(rows: list[dict], checks: dict, runs: list[dict] | None = None) -> str:
    """The speed table (ratios against the anchor's rows of the same run), the matmul floor, the checks,
    and, for combined files, which commit and device each run measured."""
    lines = ["| model (drop path) | impl | infer img/s | train img/s | train wall / GPU-busy ms | MFU | "
             "train peak GiB | infer vs anchor's best compiled | train vs anchor's best compiled | "
             "mem vs anchor eager |", "|---|---|---|---|---|---|---|---|---|---|"]
    groups = _groups(rows)
    labels = _labels(groups)
    for key, group in groups.items():
        anchor = "official" if key[0] in OFFICIAL else "timm"
        compiled = [r for r in group if r["impl"] in (f"{anchor}_compile", f"{anchor}_compile_ro")]
        ti = max(compiled, key=lambda r: r["infer_img_s"], default=None)
        tt = max(compiled, key=lambda r: r["train_img_s"], default=None)
        te = next((r for r in group if r["impl"] == f"{anchor}_eager"), None)
        for r in sorted(group, key=lambda r: IMPLS.index(r["impl"])):
            mfu = f"{100 * r['train_mfu']:.1f}%" if r.get("train_mfu") else "-"
            impl = r["impl"] + (f" [{r['compile_ops']}]" if r.get("compile_ops") not in (None, "table") else "")
            lines.append(f"| {labels[key]} ({r.get('drop_path', 0.0)}) | {impl} | {r['infer_img_s']:.0f} | "
                         f"{r['train_img_s']:.0f} | {_x(r.get('train_wall_ms'), '.1f')} / "
                         f"{_x(r.get('train_gpu_busy_ms'), '.1f')} | {mfu} | "
                         f"{_x(r.get('train_peak_gib'), '.2f')} | {_ratio(r, ti, 'infer_img_s')} | "
                         f"{_ratio(r, tt, 'train_img_s')} | {_ratio(r, te, 'train_peak_gib')} |")
    lines += floor_lines(rows)
    if checks:
        lines += ["", "| model | mode | logits rel err vs timm | grad rel err all / median / max (param) | "
                  "vs timm fp32, logits / grads: ours, timm |", "|---|---|---|---|---|"]
        for name, c in checks.items():
            for key, v in c.items():
                if key.endswith("_fp32"):  # official / deploy-form checks
                    lines.append(f"| {name} | fp32 | {key}: {v:.1e} | - | - |")
            for mode in ("fp32", "bf16"):
                m = c.get(mode)
                if m:
                    lines.append(f"| {name} | {mode} | {m['logits_rel_err']:.1e} | {_x(m.get('grad_rel_err_all'), '.1e')} / "
                                 f"{m['grad_rel_err_median']:.1e} / "
                                 f"{m['grad_rel_err_max']:.1e} ({m['grad_rel_err_max_param']}) | {_vs_fp32(m)} |")
    if runs and len(runs) > 1:
        lines += ["", "| run | commit | device | torch | date | models |", "|---|---|---|---|---|---|"]
        for i, m in enumerate(runs):
            names = ", ".join(dict.fromkeys(r["model"] for r in rows if r.get("run", 0) == i))
            lines.append(f"| {i + 1} | {m.get('commit', '-')} | {m.get('device', '-')} | {m.get('torch', '-')} | "
                         f"{m.get('date', '-')} | {names} |")
    return "\n".join(lines) + "\n"


def write(out_dir: str, rows, checks, meta, stem="models"):
    """JSON and Markdown of the rows so far (each written to a temp file, then renamed)."""
    md = markdown(rows, checks, meta.get("runs"))
    for ext, text in (("json", json.dumps(dict(meta=meta, rows=rows, checks=checks), indent=1)), ("md", md)):
        path = os.path.join(out_dir, f"{stem}.{ext}")
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return md


def git_commit() -> str:
    """The measured commit: ``$METAZOO_COMMIT`` when set (a copied tree's ``.git`` may be stale), else
    ``git rev-parse HEAD`` of this checkout."""
    if os.environ.get("METAZOO_COMMIT"):
        return os.environ["METAZOO_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=RECIPES.parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _choices(arg: str, value: str, accepted) -> list[str]:
    items = [v for v in value.split(",") if v]
    if set(items) - set(accepted):
        raise ValueError(f"{arg}: unknown {sorted(set(items) - set(accepted))}; accepted: {', '.join(accepted)}")
    return items


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--models", default=",".join(MODELS), help=f"accepted: {', '.join(OURS)}")
    ap.add_argument("--official-dir", action="append", default=[],
                    help="repeatable; a folder holding sail-sg's metaformer_baselines.py (official_* rows of "
                         "IdentityFormer/RandFormer) or mmpretrain's riformer.py + poolformer.py (RIFormer)")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--compile-ops", default="table",
                    help="our compiled rows once per policy (comma list of custom, inductor, table; "
                         "kernels.dispatch.COMPILE_OPS)")
    ap.add_argument("--drop-path", type=float, default=None,
                    help="default: the recipe's (configs/recipe/<family>.yaml)")
    ap.add_argument("--device", default="cuda", help="cuda; cpu for a smoke run of the code path")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--infer-batch", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=0, help="default: 128 (64 for caformer_b36)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--commit", default=None, help="default: git rev-parse HEAD, else $METAZOO_COMMIT")
    ap.add_argument("--profile", default="", help="only write torch.profiler tables of this impl (timm_eager, ours_eager)")
    ap.add_argument("--check", action="store_true", help="compare ours with timm (same weights, drop path 0) first")
    ap.add_argument("--combine", nargs="*", help="merge these JSON results into one table")
    ap.add_argument("--stem", default="models")
    args = ap.parse_args(argv)
    if args.device not in ("cuda", "cpu"):
        raise ValueError(f"--device: {args.device!r}; accepted: cuda, cpu")
    if args.drop_path is not None and not 0.0 <= args.drop_path < 1.0:
        raise ValueError(f"--drop-path: {args.drop_path}; accepted: 0 <= p < 1")
    args.names = _choices("--models", args.models, OURS)
    for folder in args.official_dir:
        load_official(folder)
    args.impl_list = _choices("--impls", args.impls, IMPLS)
    args.policies = _choices("--compile-ops", args.compile_ops, COMPILE_POLICIES)
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.combine:
        rows, checks, metas = [], {}, []
        for path in args.combine:  # each row keeps its run (a combined input's runs are kept as they are)
            with open(path) as f:
                d = json.load(f)
            rows += [dict(r, run=len(metas) + r.get("run", 0)) for r in d["rows"]]
            checks.update(d.get("checks", {}))
            metas += d["meta"].get("runs") or [d["meta"]]
        print(write(args.out, rows, checks, dict(runs=metas), args.stem))
        return
    torch.backends.cudnn.benchmark = True
    if args.profile:
        profile(args.out, args.names, args.profile, args)
        return
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = dict(device=device_name, torch=torch.__version__, date=time.strftime("%Y-%m-%d"), size=args.size,
                infer_batch=args.infer_batch, iters=args.iters, warmup=args.warmup, optimizer="AdamW fused",
                dtype="bf16 autocast", memory_format="channels_last", kernels=os.environ.get("METAZOO_KERNELS", "auto"),
                commit=args.commit or git_commit(), peak_bf16_tflops=peak_tflops(args.device),
                compile_ops_table=dict(COMPILE_OPS), compile_ops_env=os.environ.get(COMPILE_ENV_VAR))
    checks, rows = {}, []
    if args.check:
        for name in args.names:
            checks[name] = (check_against_timm(name, args.device, args.size) if name in MODELS
                            else check_against_official(name, args.device, args.size))
            print(name, json.dumps(checks[name]), flush=True)
            if name in MODELS:  # the fused kernels' drop-path path, at the recipe rate, masks seeded alike
                dp = recipe_drop_path(name) if args.drop_path is None else args.drop_path
                checks[f"{name}@drop_path"] = check_against_timm(name, args.device, args.size, drop_path=dp)
                print(name, "drop path", json.dumps(checks[f"{name}@drop_path"]), flush=True)
            write(args.out, rows, checks, meta, args.stem)
    for name in args.names:
        drop_path = recipe_drop_path(name) if args.drop_path is None else args.drop_path
        flops = train_flops(name if name in MODELS else OURS[name], 1, args.size)
        for impl in args.impl_list:
            if not applicable(name, impl):
                print(f"skip {name} {impl}: no such implementation here", flush=True)
                continue
            for policy in compile_policies(impl, args.policies):
                row = run_one(name, impl, args, drop_path, flops, policy)
                kernels = row.pop("train_kernels")
                if kernels:  # the profiled training steps' kernels, beside the JSON
                    with open(os.path.join(args.out, f"{args.stem}_kernels.txt"), "a") as f:
                        f.write(f"### {name} {impl} [{policy or '-'}] (drop path {drop_path}, batch "
                                f"{row['train_batch']}): {kernels}\n\n")
                rows.append(row)
                print(json.dumps(row), flush=True)
                write(args.out, rows, checks, meta, args.stem)
    print(write(args.out, rows, checks, meta, args.stem))


if __name__ == "__main__":
    main()
