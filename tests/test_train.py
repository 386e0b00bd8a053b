"""Training app: shapes data, config validation, exact resume after SIGKILL, atomic checkpoints, DDP (gloo), validate."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from metazoo.datasets import shapes
from metazoo.train.checkpoint import (latest_checkpoint, list_checkpoints, load_training_state, remove_interrupted,
                                      save_checkpoint)

TINY_MODEL = "mz_poolformerv2_s12"
ENV = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """One shapes cache for the session (each distinct size/count is generated once)."""
    return tmp_path_factory.mktemp("shapes-cache")


def tiny_overrides(cache: Path, *extra: str) -> list[str]:
    """A few-second job: 32 px, 8 train / 4 val images per class, batch 8, 3 epochs."""
    return [f"model.name={TINY_MODEL}", f"data.root={cache}", "data.img_size=32", "data.shapes_train_per_class=8",
            "data.shapes_val_per_class=4", "data.batch_size=8", "data.workers=0", "epochs=3",
            "optim.lr=2e-3", "optim.lr_base_batch=8", "logger.wandb=disabled", "logger.progress=false",
            "logger.log_interval=1", "threads=1", *extra]


def train_cmd(run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "metazoo.train", f"hydra.run.dir={run_dir}", *overrides]


def run_ok(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def comparable(history: list[dict]) -> list[dict]:
    """Per-epoch numbers that must be reproducible (timings dropped)."""
    keep = ("epoch", "train_loss", "lr", "num_updates", "val_loss", "val_top1", "val_top5", "steps")
    return [{k: r[k] for k in keep} for r in history]


# --- shapes -----------------------------------------------------------------------------------------


def test_shapes_deterministic_imagefolder(tmp_path):
    a = shapes.write_shapes_imagefolder(tmp_path / "a", image_size=24, train_per_class=2, val_per_class=1, seed=3)
    b = shapes.write_shapes_imagefolder(tmp_path / "b", image_size=24, train_per_class=2, val_per_class=1, seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == len(shapes.SHAPE_CLASSES) * 3
    assert sorted(p.relative_to(b) for p in b.rglob("*.png")) == files
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert sorted(p.name for p in (a / "train").iterdir()) == list(shapes.SHAPE_CLASSES)
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp dir left


def test_draw_shape_returns_its_mask():
    canvas = np.zeros((64, 64, 3), np.uint8)
    circle = shapes.ShapeSpec("circle", (31.5, 31.5), 20.0, 0.0, (255, 0, 0))
    mask = shapes.draw_shape(canvas, circle)
    assert abs(mask.sum() / (math.pi * 20.0**2) - 1) < 0.03
    assert (canvas[mask] == (255, 0, 0)).all() and (canvas[~mask] == 0).all()
    ring = shapes.shape_mask(shapes.ShapeSpec("ring", (31.5, 31.5), 20.0, 0.0, (1, 1, 1)), 64, 64)
    assert not ring[32, 32] and ring.sum() < mask.sum()
    square = shapes.shape_mask(shapes.ShapeSpec("square", (31.5, 31.5), 20.0, 45.0, (1, 1, 1)), 64, 64)
    assert abs(square.sum() / (2 * 20.0**2) - 1) < 0.05  # square of circumradius r has area 2 r^2
    with pytest.raises(ValueError, match="kind"):
        shapes.shape_mask(shapes.ShapeSpec("hexagon", (5, 5), 3, 0, (0, 0, 0)), 10, 10)


# --- config validation --------------------------------------------------------------------------------


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    import metazoo.train.app  # noqa: F401  (registers the schema)

    with initialize_config_module("metazoo.configs", version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


@pytest.mark.parametrize("override,key", [
    ("model.name=mz_not_a_model", "model.name"),
    ("optim.lr=-0.1", "optim.lr"),
    ("data.batch_size=0", "data.batch_size"),
    ("aug.smoothing=1.5", "aug.smoothing"),
    ("amp.dtype=fp8", "amp.dtype"),
    ("optim.name=adamq", "optim.name"),
    ("data=imagenet", "data.root"),
    ("data.root=/does/not/exist", "data.root"),
    ("model.compile=fast", "model.compile"),
])
def test_bad_config_values_name_the_key(override, key):
    from metazoo.train.config import check_config

    overrides = [override] if override.startswith("data.root") is False else ["data=imagenet", override]
    with pytest.raises(ValueError, match=f"'{key}'"):
        check_config(compose(*overrides))


def test_compile_mode_default_is_cuda_graphs_on_gpu_and_eager_on_cpu():
    """model.compile=auto (the default): reduce-overhead on CUDA, eager on CPU; true/false keep their meaning."""
    from metazoo.train.config import compile_mode

    assert compose().model.compile == "auto"
    assert compile_mode("auto", "cuda") == "reduce-overhead" and compile_mode("auto", "cpu") is None
    for value, device, mode in ((True, "cpu", "default"), ("false", "cuda", None), ("off", "cuda", None),
                                ("max-autotune", "cuda", "max-autotune")):
        assert compile_mode(compose(f"model.compile={value}").model.compile, device) == mode


def test_fused_optimizer_step():
    """optim.fused reaches torch's optimizer; an optimizer without a fused step is refused by key."""
    from metazoo.train.app import build_optimizer
    from metazoo.train.config import check_config

    cfg = compose("optim.fused=true")
    check_config(cfg)
    assert build_optimizer(cfg, torch.nn.Linear(3, 3), 1e-3).defaults["fused"] is True
    assert not build_optimizer(compose(), torch.nn.Linear(3, 3), 1e-3).defaults.get("fused")
    with pytest.raises(ValueError, match="'optim.fused'"):
        check_config(compose("optim=lamb", "optim.fused=true"))


def test_default_and_recipe_configs_pass_checks(tmp_path):
    from metazoo.train.app import batch_plan
    from metazoo.train.config import check_config

    check_config(compose())
    cfg = compose("recipe=caformer", f"data.root={tmp_path}", "data.batch_size=128")
    check_config(cfg)
    assert (cfg.optim.name, cfg.optim.lr, cfg.sched.warmup_epochs, cfg.epochs) == ("lamb", 8e-3, 20, 300)
    assert cfg.per_model["mz_caformer_s18"]["drop_path_rate"] == 0.15
    assert batch_plan(cfg, world_size=8) == (4, 4096, 8e-3)  # 128 x 8 GPUs x 4 accumulation
    no_target = compose("recipe=caformer", f"data.root={tmp_path}", "data.batch_size=128", "optim.global_batch=null")
    assert batch_plan(no_target, world_size=2) == (1, 256, 8e-3 * 256 / 4096)  # lr scaled linearly
    with pytest.raises(ValueError, match="'model.drop_path_rate'"):  # model outside the recipe's table
        check_config(compose("recipe=caformer", f"data.root={tmp_path}", f"model.name={TINY_MODEL}"))


def test_cli_rejects_bad_values_before_training(tmp_path):
    proc = subprocess.run(train_cmd(tmp_path / "run", ["optim.lr=-1"]), env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "optim.lr" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    proc = subprocess.run(train_cmd(tmp_path / "run2", ["optim.lr=fast"]), env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "optim.lr" in proc.stderr  # a type error, caught by the schema


# --- checkpoints ----------------------------------------------------------------------------------------


def _state(epoch: int) -> dict:
    return {"epoch": epoch, "num_updates": 3 * epoch, "optimizer": {"lr": torch.tensor([0.1 * epoch])}}


def test_checkpoint_roundtrip_and_keep_last(tmp_path):
    weights = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    for epoch in range(4):
        save_checkpoint(tmp_path, epoch, weights, _state(epoch), {"model": "m"}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch_0002", "epoch_0003"]
    model, ema, state = load_training_state(latest_checkpoint(tmp_path))
    assert ema is None and state["epoch"] == 3 and torch.equal(model["w"], weights["w"])


def test_half_written_checkpoint_never_replaces_previous(tmp_path):
    """A save SIGKILLed while writing leaves the previous checkpoint as the latest, intact."""
    good = {"w": torch.arange(12.0).reshape(3, 4)}
    save_checkpoint(tmp_path, 0, good, _state(0))
    pid = os.fork()
    if pid == 0:  # child: die in the middle of writing the state file of epoch 1
        def dying_save(obj, path, *a, **k):
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 partial")
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = dying_save
        save_checkpoint(tmp_path, 1, {"w": torch.zeros(3, 4)}, _state(1))
        os._exit(0)  # not reached
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert any(p.name.startswith(".tmp-epoch_0001") for p in tmp_path.iterdir())  # the partial save exists
    assert latest_checkpoint(tmp_path).name == "epoch_0000"
    model, _, state = load_training_state(latest_checkpoint(tmp_path))
    assert torch.equal(model["w"], good["w"]) and state["epoch"] == 0
    remove_interrupted(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_0000"]


# --- end to end ---------------------------------------------------------------------------------------------


def test_sigkill_and_resume_reproduces_uninterrupted_run(tmp_path, cache):
    ref, _ = kill_and_resume(tmp_path, tiny_overrides(cache, "epochs=4"))
    assert (ref / "metrics.png").stat().st_size > 0


def kill_and_resume(tmp_path: Path, overrides: list[str], keys: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Run a 4-epoch job uninterrupted and SIGKILLed after its second checkpoint, then resumed: the
    per-epoch numbers (plus ``keys``) and the final weights must be identical. Returns both run dirs."""
    ref = tmp_path / "ref"
    run_ok(train_cmd(ref, overrides))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(killed, overrides), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while latest_checkpoint(killed / "checkpoints") is None or latest_checkpoint(killed / "checkpoints").name < "epoch_0001":
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survivors = [p.name for p in list_checkpoints(killed / "checkpoints")]
    assert "epoch_0003" not in survivors, "the run finished before the kill"
    out = run_ok(train_cmd(killed, overrides))  # ckpt.resume=auto is the default
    assert "epochs 2->4" in out.stdout or "epochs 3->4" in out.stdout

    a, b = metrics(ref), metrics(killed)
    assert comparable(a["epochs"]) == comparable(b["epochs"])
    assert [[r[k] for k in keys] for r in a["epochs"]] == [[r[k] for k in keys] for r in b["epochs"]]
    wa = load_file(ref / "checkpoints" / "epoch_0003" / "model.safetensors")
    wb = load_file(killed / "checkpoints" / "epoch_0003" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    return ref, killed


def test_torchrun_two_processes_match_single_process(tmp_path, cache):
    """Same global batch (2 ranks x 8, 1 x 16, 1 x 8 with 2 accumulation steps), no random augmentation:
    identical per-step losses."""
    common = tiny_overrides(cache, "aug=none", "epochs=2", "optim.lr_base_batch=16")
    single = tmp_path / "single"
    run_ok(train_cmd(single, common + ["data.batch_size=16"]))
    accum = tmp_path / "accum"
    run_ok(train_cmd(accum, common + ["data.batch_size=8", "optim.global_batch=16"]))
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "metazoo.train", f"hydra.run.dir={ddp}", *common, "data.batch_size=8"]
    out = run_ok(cmd)
    assert "on 2 x cpu" in out.stdout
    s, d, a = metrics(single)["epochs"], metrics(ddp)["epochs"], metrics(accum)["epochs"]
    s_steps = [x["loss"] for r in s for x in r["steps"]]
    d_steps = [x["loss"] for r in d for x in r["steps"]]
    a_steps = [x["loss"] for r in a for x in r["steps"]]
    assert len(s_steps) == len(d_steps) == len(a_steps) == 6
    assert len(set(np.round(s_steps, 3))) > 1  # the loss moves: the runs really train
    np.testing.assert_allclose(d_steps, s_steps, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a_steps, s_steps, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([r["val_loss"] for r in d], [r["val_loss"] for r in s], rtol=1e-4)
    assert [r["val_top1"] for r in d] == [r["val_top1"] for r in s]


def test_validate_reports_expected_accuracy(tmp_path):
    """Label a tiny ImageFolder so that exactly 18 of 24 images match the model's predictions."""
    import timm

    from metazoo.train.evaluate import main as validate_main

    torch.manual_seed(0)
    n_cls = 6
    model = timm.create_model(TINY_MODEL, num_classes=n_cls).eval()
    meta = {"model": TINY_MODEL, "num_classes": n_cls, "model_kwargs": {},
            "data_config": {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3,
                            "std": [0.5] * 3, "crop_pct": 1.0}}
    ckpt = save_checkpoint(tmp_path / "ckpt", 0, model.state_dict(), {"epoch": 0}, meta)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(1).tolist()
    labels = pred[:18]
    for i in range(18, 24):  # wrong labels, chosen to give every class folder at least one image
        missing = [c for c in range(n_cls) if c not in labels and c != pred[i]]
        labels.append(missing[0] if missing else (pred[i] + 1) % n_cls)
    assert sorted(set(labels)) == list(range(n_cls))
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = tmp_path / "data" / "val" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}.png")
    top5 = logits.topk(5, dim=1).indices
    expected_top5 = 100.0 * sum(label in top5[i].tolist() for i, label in enumerate(labels)) / 24
    result = validate_main([str(tmp_path / "data"), "--checkpoint", str(ckpt), "--workers", "0",
                            "--batch-size", "7", "--json", str(tmp_path / "r.json")])
    assert result["top1"] == pytest.approx(75.0) and result["count"] == 24
    assert result["top5"] == pytest.approx(expected_top5)
    assert json.loads((tmp_path / "r.json").read_text())["top1"] == pytest.approx(75.0)


@pytest.mark.slow
def test_default_command_reaches_90_percent(tmp_path, cache):
    """`python -m metazoo.train` with no arguments (only the run dir and data cache placed in tmp)."""
    run_dir = tmp_path / "default"
    t0 = time.time()
    out = run_ok(train_cmd(run_dir, [f"data.root={cache}"]), timeout=1200)
    m = metrics(run_dir)
    print(f"default run: top-1 {m['summary']['final_top1']:.2f}% in {time.time() - t0:.0f}s")
    assert m["summary"]["final_top1"] >= 90.0, out.stdout[-2000:]
    assert (run_dir / "metrics.png").stat().st_size > 0
    assert latest_checkpoint(run_dir / "checkpoints") is not None
