"""bench/models.py on CPU (smoke mode): every row's code path, the recipe drop paths, FLOPs, JSON and --combine."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from metazoo.bench import models as bench
from metazoo.kernels import dispatch


def test_recipe_drop_paths_are_the_published_ones():
    # sail-sg/poolformer and sail-sg/metaformer training scripts, yuweihao/MambaOut README
    assert {n: bench.recipe_drop_path(n) for n in bench.MODELS} == {
        "poolformer_s12": 0.1, "convformer_s18": 0.2, "caformer_s18": 0.15, "mambaout_tiny": 0.2, "caformer_b36": 0.6}


def test_bad_arguments_name_the_flag():
    with pytest.raises(ValueError, match="--models"):
        bench.parse_args(["--models", "resnet50"])
    with pytest.raises(ValueError, match="--impls"):
        bench.parse_args(["--impls", "ours_fast"])
    with pytest.raises(ValueError, match="--drop-path"):
        bench.parse_args(["--drop-path", "1.0"])
    with pytest.raises(ValueError, match="--compile-ops"):
        bench.parse_args(["--compile-ops", "custom,fused"])


def test_train_flops_are_forward_plus_backward():
    with FlopCounterMode(display=False) as fwd:
        timm.create_model("poolformer_s12", num_classes=1000)(torch.randn(1, 3, 32, 32))
    step = bench.train_flops("poolformer_s12", 1, 32)
    # backward of every conv / linear is two products of its forward's size; the stem needs no input grad
    assert 2.8 * fwd.get_total_flops() < step <= 3 * fwd.get_total_flops()


@pytest.mark.parametrize("impls", [("timm_eager", "ours_eager"), pytest.param(bench.SPEED_ROWS, marks=pytest.mark.slow)])
def test_smoke_run_writes_every_row_and_combines(tmp_path, impls):
    bench.main(["--device", "cpu", "--models", "poolformer_s12", "--impls", ",".join(impls), "--iters", "1",
                "--warmup", "0", "--infer-batch", "1", "--train-batch", "1", "--size", "32", "--out", str(tmp_path),
                "--commit", "abc"])
    d = json.loads((tmp_path / "models.json").read_text())
    assert d["meta"]["commit"] == "abc" and d["meta"]["optimizer"] == "AdamW fused"
    rows = {r["impl"]: r for r in d["rows"]}
    assert tuple(rows) == impls
    flops = bench.train_flops("poolformer_s12", 1, 32)
    for r in rows.values():
        assert r["drop_path"] == 0.1 and r["train_batch"] == 1 and r["train_flops_per_step"] == flops
        assert r["infer_img_s"] > 0 and r["train_img_s"] == pytest.approx(1e3 / r["train_wall_ms"])
        assert r["train_mfu"] is None and r["train_gpu_busy_ms"] is None  # no GPU: no peak, no kernels
    bench.main(["--combine", str(tmp_path / "models.json"), "--out", str(tmp_path), "--stem", "all"])
    table = (tmp_path / "all.md").read_text()
    assert all(f"| poolformer_s12 (0.1) | {impl} |" in table for impl in impls)


def test_combined_runs_compare_rows_of_their_own_run(tmp_path):
    """--combine keeps each row's run: ratios use the anchor's best compiled row of that run only."""
    def row(impl, infer, train, mem):
        return dict(model="poolformer_s12", impl=impl, drop_path=0.1, infer_img_s=infer, train_img_s=train,
                    train_peak_gib=mem)

    runs = {"a": [row("timm_eager", 50.0, 5.0, 4.0), row("timm_compile_ro", 100.0, 10.0, 3.0)],
            "b": [row("timm_compile", 200.0, 16.0, 3.0), row("timm_compile_ro", 190.0, 20.0, 3.0),
                  row("ours_compile_ro", 220.0, 30.0, 1.5)]}
    for name, rows in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(meta=dict(commit=f"c_{name}"), rows=rows, checks={})))
    bench.main(["--combine", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path)])
    d = json.loads((tmp_path / "models.json").read_text())
    assert [r["run"] for r in d["rows"]] == [0, 0, 1, 1, 1] and [m["commit"] for m in d["meta"]["runs"]] == ["c_a", "c_b"]
    table = (tmp_path / "models.md").read_text()
    # infer vs run 2's best compiled anchor (200, default mode), train vs its best (20, reduce-overhead); no eager anchor
    assert "| poolformer_s12, run 2 (0.1) | ours_compile_ro | 220 | 30 |" in table
    assert table.split("| poolformer_s12, run 2 (0.1) | ours_compile_ro |")[1].splitlines()[0].endswith(
        "| 1.10x | 1.50x | - |")
    assert "| 2 | c_b |" in table


def test_check_matches_timm_in_train_mode_at_the_recipe_drop_path():
    """--check's drop-path comparison: both forwards seeded alike draw the same masks (fp32, CPU reference path)."""
    c = bench.check_against_timm("poolformer_s12", "cpu", 32, batch=4, drop_path=0.1)
    assert c["drop_path"] == 0.1 and c["load"] == "<All keys matched successfully>"
    assert c["fp32"]["logits_rel_err"] <= 1e-5 and c["fp32"]["grad_rel_err_all"] <= 1e-5
    bf16 = c["bf16"]  # both models' bf16 error against timm's fp32 result: real, and ours within 2x timm's own
    assert 0 < bf16["timm_vs_timm_fp32"]["logits"] < 0.05
    assert bf16["ours_vs_timm_fp32"]["logits"] <= 2 * bf16["timm_vs_timm_fp32"]["logits"]


@pytest.mark.slow
def test_overhead_script_runs_and_profiles(tmp_path):
    bench_dir = Path(bench.__file__).parent
    subprocess.run([sys.executable, "overhead.py", "--device", "cpu", "--models", "poolformer_s12", "--batch", "2",
                    "--size", "32", "--iters", "1", "--top", "5", "--out", str(tmp_path)], cwd=bench_dir, check=True)
    d = json.loads((tmp_path / "overhead.json").read_text())
    assert d["device"] == "cpu" and d["rows"][0]["ours_eager"] > 0 and d["rows"][0]["timm_eager"] > 0
    assert "ours_eager: 5 training steps" in (tmp_path / "overhead.txt").read_text()


_STAND_IN_USER = {  # files that import what mmpretrain's riformer.py / poolformer.py import (not their code)
    "poolformer.py": """
import torch.nn as nn
from mmcv.cnn.bricks import DropPath, build_activation_layer, build_norm_layer
from .base_backbone import BaseBackbone


class Stem(nn.Sequential):
    def __init__(self, dim, drop_path):
        super().__init__(nn.Conv2d(3, dim, 4, 4), build_norm_layer(dict(type="GN", num_groups=1), dim)[1],
                         build_activation_layer(dict(type="GELU")), DropPath(drop_path))
""",
    "riformer.py": """
from mmengine.model import BaseModule
from mmpretrain.registry import MODELS
from .base_backbone import BaseBackbone
from .poolformer import Stem


@MODELS.register_module()
class RIFormer(BaseBackbone):
    arch_settings = {"s12": {"embed_dims": [6]}}

    def __init__(self, arch="s12", drop_path_rate=0.0, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        self.stem = Stem(self.arch_settings[arch]["embed_dims"][-1], drop_path_rate)

    def forward(self, x):
        return (self.stem(x),)
""",
}


def test_official_mmpretrain_files_import_without_mmcv_mmengine_mmpretrain(tmp_path, monkeypatch):
    """--official-dir with mmpretrain-style files: their mmcv / mmengine / mmpretrain imports resolve to the
    stand-ins only while they are imported, and the official row builds mmpretrain's classifier layout."""
    import sys

    from timm.layers import DropPath

    from metazoo.bench import official_mmpretrain

    monkeypatch.setattr(bench, "_official", {})
    with pytest.raises(ValueError, match="--official-dir"):
        bench.load_official(str(tmp_path))
    for name, text in _STAND_IN_USER.items():
        (tmp_path / name).write_text(text)
    before = {k: sys.modules.get(k) for k in ("mmcv", "mmcv.cnn", "mmengine.model", "mmpretrain.registry")}
    bench.load_official(str(tmp_path))
    assert {k: sys.modules.get(k) for k in before} == before
    assert bench.applicable("riformer_s12", "official_eager") and not bench.applicable("identityformer_s12", "official_eager")
    model = bench.build("riformer_s12", "official_eager", 0.2, "cpu")
    assert sorted(model.state_dict())[-2:] == ["head.fc.bias", "head.fc.weight"]
    norm, drop = model.backbone.stem[1], model.backbone.stem[3]
    assert isinstance(norm, torch.nn.GroupNorm) and norm.num_groups == 1 and norm.eps == 1e-5
    assert isinstance(drop, DropPath) and drop.drop_prob == 0.2
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)
    with pytest.raises(ValueError, match="norm_cfg"):
        official_mmpretrain.build_norm_layer(dict(type="BN"), 4)


@pytest.mark.slow
def test_compiled_rows_run_once_per_compile_policy(tmp_path):
    """--compile-ops runs our compiled rows under each policy (the eager row once), labelled in the table."""
    bench.main(["--device", "cpu", "--models", "poolformer_s12", "--impls", "ours_eager,ours_compile",
                "--compile-ops", "custom,inductor", "--iters", "1", "--warmup", "0", "--infer-batch", "1",
                "--train-batch", "1", "--size", "32", "--out", str(tmp_path), "--commit", "abc"])
    d = json.loads((tmp_path / "models.json").read_text())
    assert [(r["impl"], r["compile_ops"]) for r in d["rows"]] == [
        ("ours_eager", None), ("ours_compile", "custom"), ("ours_compile", "inductor")]
    table = (tmp_path / "models.md").read_text()
    assert "| ours_compile [custom] |" in table and "| ours_compile [inductor] |" in table

@pytest.mark.slow
def test_compiled_kernel_mode_smoke_run(tmp_path):
    """bench/kernels.py --compiled on CPU (Triton's interpreter, aot_eager): both sides of two ops timed
    in both passes, JSON rows, the custom op agreeing with the reference, one table line per op."""
    import os

    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "kernels.py", "--compiled", "--tiny", "--device", "cpu", "--batch", "2",
                    "--ops", "star_relu,scale_add", "--out", str(tmp_path)],
                   cwd=Path(bench.__file__).parent, env=env, check=True, capture_output=True)
    d = json.loads((tmp_path / "kernels_compiled.json").read_text())
    assert d["meta"]["commit"] == bench.git_commit()  # the code measured
    rows = d["rows"]
    assert [r["op"] for r in rows] == ["scale_add", "star_relu"]
    for r in rows:
        assert all(r[f"{side}_{p}_ms"] > 0 for side in ("custom", "inductor") for p in ("fwd", "fwd_bwd"))
        assert r["out_rel_err"] < 1e-2  # bf16 custom op vs bf16 reference
    lines = (tmp_path / "kernels_compiled.md").read_text()
    assert '"scale_add": "' in lines and '"star_relu": "' in lines


@pytest.mark.skipif(not dispatch.triton_available(), reason="needs Triton (its interpreter on CPU)")
def test_activation_memory_emulates_cuda_norms_and_counts_ours_below_timm():
    """bench/activation_memory.py on CPU: under its CUDA norm policy timm's LayerNorm returns fp32 in
    autocast (as on the GPU) and so do our kernels; ours keeps fewer bytes per image for backward."""
    from metazoo.bench import activation_memory as am
    from metazoo.kernels.norm_residual import layer_norm

    x, w = torch.randn(2, 4, 3, 3).bfloat16(), torch.ones(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.layer_norm(x, (3,)).dtype == torch.bfloat16  # CPU autocast's own policy
        with am.cuda_norm_policy("cpu"):
            assert torch.nn.functional.layer_norm(x, (3,)).dtype == torch.float32
            assert layer_norm(x, w, channels_first=True, backend="triton").dtype == torch.float32
    rows = [am.measure("poolformer_s12", ours, 1, 32, "cpu") for ours in (False, True)]
    assert 0 < rows[1]["bytes_per_image"] < 0.8 * rows[0]["bytes_per_image"], rows


def test_kernel_kinds_and_the_matmul_floor():
    kinds = {"nvjet_sm90_tst_160x128_64x5_1x2_h_bz_NNN": "matmul",
             "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
             "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>": "attention",
             "sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc": "conv",
             "dgrad2d_c1_k1_nhwc_specialized": "conv",
             "triton_per_fused_convolution_backward_native_layer_norm_0": "other",
             "triton_tem_fused_mm_3": "matmul",
             "void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor>": "other"}
    assert {k: bench.kernel_kind(k) for k in kinds} == kinds
    rows = [dict(model="m", impl="timm_compile", train_img_s=100.0, train_wall_ms=40.0,
                 train_gpu_ms_by_kind=dict(matmul=18.0, attention=2.0, other=19.0)),
            dict(model="m", impl="timm_eager", train_img_s=50.0, train_wall_ms=80.0,
                 train_gpu_ms_by_kind=dict(matmul=19.0, attention=2.5, other=50.0)),
            dict(model="m", impl="ours_eager", train_img_s=90.0, train_wall_ms=44.0,
                 train_gpu_ms_by_kind=dict(matmul=17.0, attention=2.0, conv=3.0))]
    assert bench.floor_lines(rows)[-1] == "| m | 19.0 | timm_compile 40.0 | 2.11x |"
