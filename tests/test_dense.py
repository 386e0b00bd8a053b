"""Dense tasks: the mmdet/mmseg backbone adapter, the Hydra detect/segment apps, the shapes sets.

Needs the OpenMMLab stack (``scripts/install_openmmlab.sh``); without it the module is skipped,
unless ``METAZOO_REQUIRE_DENSE=1`` (CI) turns the missing stack into a failure.
"""
from __future__ import annotations

import functools
import json
import os
import pickle
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import timm
import torch

if os.environ.get("METAZOO_REQUIRE_DENSE") == "1":
    import mmdet.models  # noqa: F401
    import mmseg.models  # noqa: F401
else:
    pytest.importorskip("mmdet.models", reason="OpenMMLab stack absent: run scripts/install_openmmlab.sh")
    pytest.importorskip("mmseg.models", reason="OpenMMLab stack absent: run scripts/install_openmmlab.sh")

from hydra import compose as hydra_compose  # noqa: E402
from hydra import initialize_config_module  # noqa: E402
from mmengine.dataset import pseudo_collate  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

import metazoo  # noqa: E402,F401
from metazoo.train import dense_runner  # noqa: E402
from metazoo.integrations.openmmlab import MetazooBackbone, register  # noqa: E402
from metazoo.datasets.shapes_dense import write_shapes_ade, write_shapes_coco  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


FAMILIES = sorted({name.split("_")[1] for name in timm.list_models("mz_*")})


@functools.lru_cache(maxsize=None)
def smallest(family: str) -> str:
    """The registered ``mz_<family>_*`` model with the fewest parameters (counted on meta)."""
    def count(name):
        with torch.device("meta"):
            return sum(p.numel() for p in timm.create_model(name).parameters())
    return min((n for n in timm.list_models(f"mz_{family}*") if n.split("_")[1] == family), key=count)


SMALL = "mz_mambaout_femto"  # the default backbone of the shapes presets


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """Generated data sets go to a per-module temp cache, never the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("METAZOO_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


def _cfg(task: str, work_dir: Path, overrides=(), name: str | None = None):
    with initialize_config_module("metazoo.configs", version_base=None):
        return hydra_compose(name or task, overrides=[f"work_dir={work_dir}", "wandb.mode=disabled", *overrides])


# Tiny shapes sets (64-96 px, 4 train images) for the one-step tests.
DET_TINY = ["data.image_size=[64,96]", "data.train_images=4", "data.val_images=2", "data.batch_size=2"]
SEG_TINY = ["data.image_size=[64,64]", "data.crop_size=[64,64]", "data.train_images=4", "data.val_images=2",
            "data.batch_size=2"]


def _train_step(task: str, tmp_path: Path, model_name: str, overrides=()) -> torch.nn.Module:
    """Build the composed model and dataset with mmdet/mmseg registries; run one optimizer step."""
    tiny = DET_TINY if task == "detect" else SEG_TINY
    cfg = _cfg(task, tmp_path, [*tiny, f"backbone.model_name={model_name}", *overrides])
    mm = dense_runner.compose(cfg, task)
    scope = "mmdet" if task == "detect" else "mmseg"
    registry = __import__(f"{scope}.registry", fromlist=["MODELS"])
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.MODELS.build(mm.model)
        model.init_weights()
        model.train()
        dataset = registry.DATASETS.build(mm.train_dataloader.dataset)
        batch = pseudo_collate([dataset[0], dataset[1]])
        optim = build_optim_wrapper(model, mm.optim_wrapper)
        before = {k: v.detach().clone() for k, v in model.backbone.named_parameters()}
        losses = model.train_step(batch, optim)
    assert all(torch.isfinite(v).all() for v in losses.values()), losses
    changed = [k for k, v in model.backbone.named_parameters() if not torch.equal(v, before[k])]
    trainable = [k for k, v in model.backbone.named_parameters() if v.requires_grad]
    assert trainable and set(trainable) <= set(changed) | {k for k in trainable if "norms." in k}
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_rcnn_train_step(family, tmp_path):
    model = _train_step("detect", tmp_path, smallest(family))
    assert type(model).__name__ == "MaskRCNN"


@pytest.mark.parametrize("family", FAMILIES)
def test_upernet_train_step(family, tmp_path):
    model = _train_step("segment", tmp_path, smallest(family))
    assert type(model.decode_head).__name__ == "UPerHead"


def test_any_input_size():
    """Outputs follow the input's own height and width (detection images are not square)."""
    bb = MetazooBackbone(SMALL).eval()
    for h, w in ((64, 96), (97, 61)):
        outs = bb(torch.randn(1, 3, h, w))
        assert [o.shape[1] for o in outs] == bb.out_channels
        for o, s in zip(outs, bb.strides):  # floor or ceil of size / stride, by the family's padding
            assert h // s <= o.shape[2] <= -(-h // s) and w // s <= o.shape[3] <= -(-w // s)


def test_frozen_stages_and_norm_eval():
    """frozen_stages=2: stem + stages 1-2 get no grad and keep their BN statistics; later ones train."""
    bb = MetazooBackbone("resnet10t", frozen_stages=2, norm_eval=False)
    bb.train()
    frozen = {k for k, p in bb.named_parameters() if not p.requires_grad}
    assert frozen and all(bb.layer_id(k) <= 2 for k in frozen)
    assert all(p.requires_grad for k, p in bb.named_parameters() if bb.layer_id(k) > 2)
    stats = {k: v.clone() for k, v in bb.state_dict().items() if "running_" in k}
    sum(o.mean() for o in bb(torch.randn(2, 3, 64, 64))).backward()
    assert all(p.grad is None for k, p in bb.named_parameters() if k in frozen)
    moved = {k for k, v in bb.state_dict().items() if "running_" in k and not torch.equal(v, stats[k])}
    frozen_stats = {k for k in stats if bb.layer_id(k) <= 2}
    assert moved and not moved & frozen_stats  # later stages still update their BN
    # norm_eval: no BatchNorm statistic moves at all, yet every unfrozen weight trains.
    bb = MetazooBackbone("resnet10t", frozen_stages=-1, norm_eval=True).train()
    stats = {k: v.clone() for k, v in bb.state_dict().items() if "running_" in k}
    bb(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(v, stats[k]) for k, v in bb.state_dict().items() if "running_" in k)
    assert all(p.requires_grad for p in bb.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_stages_per_family(family):
    """Every family splits into stem + stages; freezing 1 leaves later stages trainable."""
    bb = MetazooBackbone(smallest(family), frozen_stages=1).train()
    ids = {bb.layer_id(k) for k, _ in bb.named_parameters()}
    assert set(range(1, bb.num_stages + 1)) <= ids
    for k, p in bb.named_parameters():
        assert p.requires_grad == (bb.layer_id(k) > 1), k
    assert not any(m.training for n, m in bb.body.named_modules() if n and bb._groups[n] <= 1)


def test_init_cfg_loads_detector_and_classification_checkpoints(tmp_path):
    """Pretrained init from (a) a detector checkpoint with backbone./module. prefixes and (b) a
    timm classification checkpoint; the backbone weights equal the file's afterwards."""
    name = SMALL
    src = MetazooBackbone(name, out_norm="gn")
    for p in src.parameters():
        p.data.normal_()
    det = tmp_path / "det.pth"
    torch.save({"meta": {"iter": 3}, "state_dict": OrderedDict(
        (f"module.backbone.{k}", v) for k, v in src.state_dict().items())}, det)
    dst = MetazooBackbone(name, out_norm="gn", init_cfg=dict(type="Pretrained", checkpoint=str(det)))
    dst.init_weights()
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k

    full = timm.create_model(name)
    for p in full.parameters():
        p.data.uniform_()
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "cls.safetensors"))
    cfg = _cfg("detect", tmp_path, [*DET_TINY, f"backbone.model_name={name}",
                                    f"backbone.checkpoint={tmp_path / 'cls.safetensors'}"])
    mm = dense_runner.compose(cfg, "detect")
    from mmdet.registry import MODELS
    model = MODELS.build(mm.model)
    model.init_weights()  # mmengine's path: BaseModule.init_weights -> the adapter's
    ref = full.state_dict()
    body = model.backbone.body.state_dict()
    matched = 0
    for k, v in body.items():
        src_key = next(c for c in (k, k.replace("_", ".", 1), k.removeprefix("model.")) if c in ref)
        assert torch.equal(v, ref[src_key]), k
        matched += 1
    assert matched == len(body)


def test_init_cfg_rejects_mismatched_checkpoint(tmp_path):
    torch.save({"state_dict": {"backbone.body.nope.weight": torch.zeros(1)}}, tmp_path / "bad.pth")
    bb = MetazooBackbone(SMALL, init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "bad.pth")))
    with pytest.raises(ValueError, match="init_cfg.checkpoint"):
        bb.init_weights()


def test_layer_decay_constructor(tmp_path):
    """Stage-wise lr decay: head at base lr, stage k at base * rate**(5 - k), stem at rate**5."""
    cfg = _cfg("segment", tmp_path, [*SEG_TINY, f"backbone.model_name={SMALL}"])
    mm = dense_runner.compose(cfg, "segment")
    from mmseg.registry import MODELS
    model = MODELS.build(mm.model)
    wrapper = build_optim_wrapper(model, dict(
        type="OptimWrapper", constructor="MetazooLayerDecayConstructor",
        optimizer=dict(type="AdamW", lr=1.0, weight_decay=0.05), paramwise_cfg=dict(layer_decay_rate=0.5)))
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in wrapper.optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        lid = model.backbone.layer_id(name[len("backbone."):]) if name.startswith("backbone.") else 5
        lr, wd = lr_of[id(p)]
        assert lr == pytest.approx(0.5 ** (5 - lid)), name
        assert wd == (0.0 if p.ndim == 1 else 0.05), name
    assert {model.backbone.layer_id(n) for n, _ in model.backbone.named_parameters()} >= {0, 1, 2, 3, 4}


@pytest.mark.parametrize("overrides, key", [
    (["backbone.model_name=mz_no_such_model"], "backbone.model_name"),
    (["backbone.out_indices=[0,1,9]"], "out_indices"),
    (["backbone.frozen_stages=7"], "frozen_stages"),
    (["backbone.out_norm=bn"], "out_norm"),
    (["data.root=/no/such/folder"], "data.root"),
    (["wandb.mode=sometimes"], "wandb.mode"),
])
def test_broken_config_names_the_key(overrides, key, tmp_path):
    cfg = _cfg("segment", tmp_path, [*SEG_TINY, f"backbone.model_name={SMALL}", *overrides])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        dense_runner.compose(cfg, "segment")


@pytest.mark.parametrize("preset", ["detect_mask_rcnn_1x_coco", "detect_retinanet_1x_coco",
                                    "segment_upernet_160k_ade20k", "segment_fpn_40k_ade20k",
                                    "segment_deeplabv3_80k_ade20k"])
def test_presets_need_data_root_and_compose(preset, tmp_path):
    """Paper presets refuse to run without data.root and compose into a buildable model with one."""
    task = preset.split("_")[0]
    over = [f"backbone.model_name={SMALL}", "backbone.checkpoint=null"]
    with pytest.raises(ValueError, match=r"data\.root"):
        dense_runner.compose(_cfg(task, tmp_path, over, name=preset), task)
    root = tmp_path / "data"
    for rel in (["annotations", "train2017", "val2017"] if task == "detect" else
                ["images/training", "images/validation", "annotations/training", "annotations/validation"]):
        (root / rel).mkdir(parents=True)
    if task == "detect":
        for split in ("train2017", "val2017"):
            (root / "annotations" / f"instances_{split}.json").write_text("{}")
    mm = dense_runner.compose(_cfg(task, tmp_path, [*over, f"data.root={root}"], name=preset), task)
    assert mm.train_dataloader.dataset.data_root.rstrip("/") == str(root)
    scope = "mmdet" if task == "detect" else "mmseg"
    registry = __import__(f"{scope}.registry", fromlist=["MODELS"])
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.MODELS.build(mm.model)
    assert isinstance(model.backbone, MetazooBackbone)


@pytest.mark.parametrize("task", ["detect", "segment"])
@pytest.mark.parametrize("family", ["randformer", "riformer"])
def test_baseline_backbone_presets_build_and_run(task, family, tmp_path):
    """The RandFormer / RIFormer backbone presets compose, build through the OpenMMLab registry, and give
    GroupNorm-normed stride 4..32 maps of a 64x96 input (RandFormer: matrices resized to the token grid)."""
    tiny = DET_TINY if task == "detect" else SEG_TINY
    mm = dense_runner.compose(_cfg(task, tmp_path, [*tiny, f"{task}/backbone={family}", "backbone.checkpoint=null"]),
                              task)
    assert mm.optim_wrapper.optimizer.lr == 2e-4 and mm.optim_wrapper.optimizer.weight_decay == 1e-4
    registry = __import__(f"{'mmdet' if task == 'detect' else 'mmseg'}.registry", fromlist=["MODELS"])
    with DefaultScope.overwrite_default_scope("mmdet" if task == "detect" else "mmseg"):
        bb = registry.MODELS.build(mm.model.backbone).eval()
    assert isinstance(bb, MetazooBackbone) and bb.model_name == f"mz_{family}_s12"
    assert all(type(n) is torch.nn.GroupNorm and n.num_groups == 1 for n in bb.norms)
    with torch.no_grad():
        outs = bb(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape[1:]) for o in outs] == [(64, 16, 24), (128, 8, 12), (320, 4, 6), (512, 2, 3)]
    assert all(torch.isfinite(o).all() for o in outs)


def test_runner_checkpoint_resume_weights_only(tmp_path):
    """mmengine Runner saves, then resumes with torch.load's weights-only default; a checkpoint
    carrying any other global is refused."""
    from mmengine.runner import Runner

    over = [*SEG_TINY, f"backbone.model_name={SMALL}", "schedule.iters=2", "schedule.warmup=1"]
    runner = Runner.from_cfg(dense_runner.compose(_cfg("segment", tmp_path / "a", over), "segment"))
    runner.train()
    ckpt = tmp_path / "a" / "iter_2.pth"
    loaded = torch.load(ckpt, map_location="cpu")  # default weights_only=True, allow-list active
    assert loaded["meta"]["iter"] == 2 and "message_hub" in loaded and "optimizer" in loaded

    loaded["meta"]["extra"] = PurePosixPath("x")  # an object of a class no allow-list names
    torch.save(loaded, tmp_path / "bad.pth")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "bad.pth", map_location="cpu")

    resumed = Runner.from_cfg(dense_runner.compose(
        _cfg("segment", tmp_path / "a", [*over, "schedule.iters=3", "resume=true"]), "segment"))
    resumed.train()
    assert resumed.iter == 3


def test_two_runs_in_one_process_keep_their_own_logs(tmp_path):
    """mmengine's visualizer, logger and message hub are per-process singletons keyed by name: a
    second run built in the same second must not write its config and scalars into the first's dir."""
    from mmengine.runner import Runner

    over = [*SEG_TINY, f"backbone.model_name={SMALL}"]
    runs = [Runner.from_cfg(dense_runner.compose(_cfg("segment", tmp_path / d, over), "segment"))
            for d in ("a", "b")]
    assert runs[0].experiment_name != runs[1].experiment_name
    assert runs[0].visualizer is not runs[1].visualizer
    for run, d in zip(runs, ("a", "b")):
        (backend,) = (b for b in run.visualizer._vis_backends.values() if type(b).__name__ == "LocalVisBackend")
        assert Path(backend._save_dir).is_relative_to(tmp_path / d)
        assert (Path(run.log_dir) / "vis_data" / "config.py").is_file()  # dumped by Runner.__init__


def test_checkpoint_killed_mid_save_never_replaces_previous(tmp_path, monkeypatch):
    """A save that dies half-way leaves the previous checkpoint, and last_checkpoint, intact; the
    outdated checkpoint is removed only after the next one exists."""
    from mmengine.runner import Runner

    over = [*SEG_TINY, f"backbone.model_name={SMALL}", "schedule.iters=3", "schedule.warmup=1",
            "mm.default_hooks.checkpoint.interval=1", "mm.default_hooks.checkpoint.max_keep_ckpts=1"]
    runner = Runner.from_cfg(dense_runner.compose(_cfg("segment", tmp_path, over), "segment"))
    real_save = Runner.save_checkpoint

    def dying_save(self, out_dir, filename, *args, **kwargs):
        if self.iter + 1 == 3:  # third save: write half a file, then die
            Path(out_dir, filename).write_bytes(b"PK\x03\x04 truncated")
            raise KeyboardInterrupt("killed mid-save")
        return real_save(self, out_dir, filename, *args, **kwargs)

    monkeypatch.setattr(Runner, "save_checkpoint", dying_save)
    with pytest.raises(KeyboardInterrupt):
        runner.train()
    assert not (tmp_path / "iter_1.pth").exists() and not (tmp_path / "iter_3.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == str(tmp_path / "iter_2.pth")
    assert torch.load(tmp_path / "iter_2.pth", map_location="cpu")["meta"]["iter"] == 2


def test_import_without_openmmlab():
    """``import metazoo`` and timm models work, and register() is a no-op, when mmdet/mmseg are absent."""
    code = ("import sys\n"
            "for m in ('mmdet', 'mmseg', 'mmengine', 'mmcv'): sys.modules[m] = None\n"
            "import metazoo, timm, torch\n"
            "from metazoo.integrations.openmmlab import MetazooBackbone, register\n"
            "assert register() == []\n"
            "m = timm.create_model(timm.list_models('mz_*')[0])\n"
            "print(MetazooBackbone(timm.list_models('mz_*')[0])(torch.randn(1, 3, 64, 64))[0].shape)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO.parent)
    assert out.returncode == 0, out.stderr


def test_register_adds_adapter_to_both_registries():
    from mmdet.registry import MODELS as DET
    from mmseg.registry import MODELS as SEG
    assert set(register()) == {"mmdet", "mmseg"}
    assert DET.get("MetazooBackbone") is MetazooBackbone and SEG.get("MetazooBackbone") is MetazooBackbone


def test_shapes_sets_are_deterministic_and_consistent(tmp_path):
    from pycocotools.coco import COCO
    a = write_shapes_coco(tmp_path / "a", image_size=(64, 96), train_images=3, val_images=2, seed=5)
    b = write_shapes_coco(tmp_path / "b", image_size=(64, 96), train_images=3, val_images=2, seed=5)
    ja = (a / "annotations/instances_train2017.json").read_text()
    assert ja == (b / "annotations/instances_train2017.json").read_text()
    coco = COCO(str(a / "annotations/instances_train2017.json"))
    for ann in coco.loadAnns(coco.getAnnIds()):
        m = coco.annToMask(ann)
        ys, xs = np.nonzero(m)
        assert ann["bbox"] == pytest.approx([xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1])
        assert ann["area"] == m.sum()
    ade = write_shapes_ade(tmp_path / "c", image_size=(64, 64), train_images=3, val_images=2)
    from PIL import Image
    lab = np.asarray(Image.open(ade / "annotations/training/000000.png"))
    assert lab.min() >= 1 and lab.max() >= 2 and lab.max() <= 7
    with pytest.raises(ValueError, match="image_size"):
        write_shapes_ade(tmp_path / "d", image_size=(8, 8))


def _run_app(module: str, tmp_path: Path) -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, "-m", module, f"hydra.run.dir={tmp_path}", "wandb.mode=disabled"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    start = out.stdout.rindex('{\n "metrics"')
    return json.loads(out.stdout[start:])["metrics"]


# The two default commands, exactly as the README runs them (one thread each under -n 2, see conftest).
@pytest.mark.slow
def test_default_detect_command_reaches_box_ap50(tmp_path):
    metrics = _run_app("metazoo.train.detect", tmp_path)
    # untrained: ~0; the default measured 0.53 and 0.54 (seeds 0, 1) and 0.59 (unfused AdamW step)
    assert metrics["coco/bbox_mAP_50"] >= 0.4, metrics


@pytest.mark.slow
def test_default_segment_command_reaches_miou(tmp_path):
    metrics = _run_app("metazoo.train.segment", tmp_path)
    assert metrics["mIoU"] >= 60.0, metrics  # mmseg reports percent


def test_dense_bench_summarizes_mmengine_logs(tmp_path):
    """Median iteration time without the warm-up interval, peak memory, last loss, final metrics."""
    from metazoo.bench.dense_bench import markdown, summarize

    lines = [dict(loss=3.0, time=9.0, memory=1200, iter=1), dict(loss=2.0, time=1.0, memory=1000, iter=2),
             dict(loss=1.5, time=3.0, memory=950, iter=3), dict(loss=1.0, time=2.0, memory=990, iter=4),
             {"coco/bbox_mAP_50": 0.4, "coco/segm_mAP_50": 0.3, "step": 4}]
    f = tmp_path / "scalars.json"
    f.write_text("\n".join(json.dumps(x) for x in lines))
    s = summarize(f, "detect")
    assert s["s_per_iter"] == 2.0 and s["last_loss"] == 1.0
    assert s["peak_memory_mb"] == 1200 and s["steady_memory_mb"] == 1000  # steady: warm-up interval left out
    assert s["metrics"] == {"coco/bbox_mAP_50": 0.4, "coco/segm_mAP_50": 0.3}
    fast = dict(s, s_per_iter=1.0)
    assert "| detect | triton | 1.000 | 2.00x | 1200 | 1000 |" in markdown({"detect/torch": s, "detect/triton": fast})


def test_dense_bench_command_runs_both_tasks(tmp_path):
    """The kernels on/off tool drives the real Hydra apps (here the reference kernels, 4 iterations on
    shapes sets of 8 train / 4 val images: the overrides reach both apps)."""
    env = dict(os.environ, WANDB_MODE="disabled")
    out = subprocess.run([sys.executable, "-m", "metazoo.bench.dense_bench", "--out", str(tmp_path),
                          "--backends", "torch", "--iters", "4", "data.train_images=8", "data.val_images=4"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = json.loads((tmp_path / "dense_bench.json").read_text())["runs"]
    assert set(runs) == {"detect/torch", "segment/torch"}
    assert runs["detect/torch"]["iters_logged"] == 4 and "coco/bbox_mAP_50" in runs["detect/torch"]["metrics"]
    assert runs["segment/torch"]["s_per_iter"] > 0 and "mIoU" in runs["segment/torch"]["metrics"]
    bad = subprocess.run([sys.executable, "-m", "metazoo.bench.dense_bench", "--out", str(tmp_path),
                          "--backends", "cuda"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "--backends='cuda'" in bad.stderr and "torch, triton" in bad.stderr


def test_mmcv_cuda_subset_cuts_only_the_named_registrations():
    """The GPU bench's mmcv build keeps the nms / RoIAlign CUDA blocks of cudabind.cpp, nothing else,
    and stops with a message when the file does not have the expected blocks."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mmcv_cuda_subset", Path(__file__).parents[1] / "bench" / "mmcv_cuda_subset.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    nms = ("Tensor NMSCUDAKernelLauncher(Tensor boxes, Tensor scores, float t, int o);\n"
           "Tensor nms_cuda(Tensor b, Tensor s, float t, int o) { return NMSCUDAKernelLauncher(b, s, t, o); }\n"
           "REGISTER_DEVICE_IMPL(nms_impl, CUDA, nms_cuda);")
    roi = ("void ROIAlignForwardCUDAKernelLauncher(Tensor input);\nvoid roi_align_backward_impl(Tensor g);\n"
           "REGISTER_DEVICE_IMPL(roi_align_forward_impl, CUDA, roi_align_forward_cuda);\n"
           "REGISTER_DEVICE_IMPL(roi_align_backward_impl, CUDA,\n                     roi_align_backward_cuda);")
    other = "void DeformConvForwardCUDAKernelLauncher(Tensor x);\nREGISTER_DEVICE_IMPL(deform_conv_impl, CUDA, dc_cuda);"
    out = mod.subset_bindings("\n\n".join([other, nms, other, roi, other]))
    assert nms in out and roi in out and "DeformConv" not in out
    with pytest.raises(SystemExit, match="cudabind.cpp: no block"):
        mod.subset_bindings(other + "\n" + nms)


def test_second_dense_run_on_a_locked_work_dir_fails_before_building(tmp_path, monkeypatch):
    """One run per work dir: while another process holds the lock, train() names the holder and builds nothing."""
    from metazoo.train.runlock import RunLock

    built = []
    monkeypatch.setattr(dense_runner.Runner, "from_cfg", lambda cfg: built.append(cfg))
    cfg = _cfg("segment", tmp_path, [*SEG_TINY, f"backbone.model_name={SMALL}"])
    with RunLock(tmp_path, key="work_dir"):
        with pytest.raises(ValueError, match=r"work_dir.*PID \d+"):
            dense_runner.train(cfg, "segment")
    assert built == []
