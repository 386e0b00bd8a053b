"""Bad inputs and faults against the training command, validation and checkpoint loaders: each is refused
with a message naming the config key or the file, before work starts where it can be (silent cases first)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from metazoo.train.checkpoint import list_checkpoints, load_latest_intact, load_training_state, save_checkpoint
from metazoo.train.config import RunError, check_config
from metazoo.train.preflight import check_classes, check_img_size, probe_writable, scan_split

from test_train import ENV, TINY_MODEL, cache, compose, metrics, tiny_overrides, train_cmd  # noqa: F401 (cache: fixture)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def image_folder(root: Path, layout: dict[str, dict[str, int]], size: int = 32, seed: int = 0) -> Path:
    """``{split: {class: n_images}}`` of random RGB PNGs under ``root``."""
    rng = np.random.default_rng(seed)
    for split, classes in layout.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


# --- silent wrong answers (before: exit 0 with wrong data, labels, weights or lr) -----------------------------


@pytest.mark.parametrize("key", ["data.train_split", "data.val_split"])
def test_misspelt_split_is_refused_not_replaced_by_the_root(tmp_path, key):
    """Before: timm's loader fell back to the root, i.e. trained / evaluated on train+val."""
    root = image_folder(tmp_path, {"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1}})
    with pytest.raises(RunError, match=f"'{key}'.*'trian'.*folders present: train, val"):
        scan_split(str(root), "trian", key)
    with pytest.raises(RunError, match=f"'{key}'.*accepted|'{key}'.*splits train, val"):
        check_config(compose(f"{key}=trian"))  # the shapes set: refused before it is generated


def test_validate_unknown_split_exits_2_naming_it(tmp_path, capsys):
    from metazoo.train.evaluate import main as validate_main

    root = image_folder(tmp_path / "data", {"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1}})
    with pytest.raises(SystemExit) as exit_info:
        validate_main([str(root), "--model", TINY_MODEL, "--num-classes", "2", "--split", "nosuch", "--workers", "0"])
    assert exit_info.value.code == 2
    assert "split: no folder 'nosuch'" in capsys.readouterr().err


def test_val_missing_a_class_keeps_the_training_class_map(tmp_path):
    """Before: val labels were re-counted from its own folders (class c became label 1): 14% top-1 for 44%."""
    root = image_folder(tmp_path, {"train": {"a": 1, "b": 1, "c": 2}, "val": {"a": 1, "c": 2}})
    train = scan_split(str(root), "train", "data.train_split")
    val = scan_split(str(root), "val", "data.val_split", {c: i for i, c in enumerate(train.classes)})
    assert train.classes == ["a", "b", "c"]
    assert sorted(label for _, label in val.samples) == [0, 2, 2]
    assert check_classes(train, val, None, report=False) == 3
    extra = image_folder(tmp_path / "x", {"train": {"a": 1, "b": 1}, "val": {"a": 1, "z": 1}})
    with pytest.raises(RunError, match="'data.val_split'.*classes the training split lacks: z"):
        scan_split(str(extra), "val", "data.val_split", {"a": 0, "b": 1})


def test_validate_uses_the_checkpoint_class_map(tmp_path):
    """A val folder lacking a class is labelled with the classes saved by training, not re-counted."""
    import timm

    from metazoo.train.evaluate import validate

    model = timm.create_model(TINY_MODEL, num_classes=3).eval()
    torch.nn.init.zeros_(model.head.fc.weight)
    with torch.no_grad():
        model.head.fc.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))  # always predicts class 2 ("c")
    meta = {"model": TINY_MODEL, "num_classes": 3, "classes": ["a", "b", "c"], "model_kwargs": {},
            "data_config": {"input_size": [3, 32, 32], "crop_pct": 1.0}}
    ckpt = save_checkpoint(tmp_path / "ckpt", 0, model.state_dict(), {"epoch": 0}, meta)
    root = image_folder(tmp_path / "data", {"val": {"a": 1, "c": 3}})
    result = validate(str(root), checkpoint=str(ckpt), workers=0)
    assert result["top1"] == pytest.approx(75.0)  # re-counted folders would call "c" label 1: 0%


def test_one_class_is_refused(tmp_path):
    """Before: loss 0 and "top-1 100%"."""
    root = image_folder(tmp_path, {"train": {"a": 2}, "val": {"a": 1}})
    train = scan_split(str(root), "train", "data.train_split")
    with pytest.raises(RunError, match="'data.root'.*1 class folder; training needs at least 2"):
        check_classes(train, scan_split(str(root), "val", "data.val_split", {"a": 0}), None)


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_lr_is_refused(value):
    with pytest.raises(RunError, match="'optim.lr'"):
        check_config(compose(f"optim.lr={value}"))


def test_unknown_plus_key_is_refused():
    """Before: ``+optim.lrr=0.1`` (Hydra's own hint for a typo) was accepted and ignored."""
    with pytest.raises(RunError, match="'optim.lrr': not a key"):
        check_config(compose("+optim.lrr=0.1"))
    with pytest.raises(RunError, match="'foo': not a key"):
        check_config(compose("+foo=1"))
    check_config(compose("+model.kwargs.in_chans=3"))  # free-form timm arguments stay open


def test_sixteen_bit_png_is_scaled_not_white(tmp_path):
    """Before: PIL's I;16 -> RGB clipped every value above 255, i.e. the image became white."""
    from metazoo.train.data import to_rgb

    ramp = (np.arange(64, dtype=np.uint16) * 1040).reshape(8, 8)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I")
        rgb = np.asarray(to_rgb(img))
    assert rgb.shape == (8, 8, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    np.testing.assert_allclose(rgb[..., 0], ramp / 257.0, atol=0.51)
    f = Image.fromarray(np.full((2, 2), 0.5, np.float32), "F")
    assert np.asarray(to_rgb(f)).max() == 128
    la = Image.fromarray(np.full((2, 2, 2), 200, np.uint8), "LA")
    assert (np.asarray(to_rgb(la)) == 200).all()


@pytest.fixture(scope="module")
def s12_weights(tmp_path_factory) -> tuple[Path, dict]:
    import timm

    sd = timm.create_model(TINY_MODEL, num_classes=1000).state_dict()
    path = tmp_path_factory.mktemp("w") / "s12.safetensors"
    save_file(sd, path)
    return path, sd


@pytest.mark.parametrize("case,match", [
    ("holes", "Missing key"), ("s24", "Unexpected key"), ("foo", "Missing key"), ("unrelated", "Missing key"),
])
def test_weights_that_do_not_fit_are_refused(tmp_path, s12_weights, case, match):
    """Before: with num_classes != 1000 timm went non-strict and logged missing keys at INFO."""
    import timm

    from metazoo.backbones._common import create_with_weights

    _, sd = s12_weights
    files = {"holes": lambda: {k: v for i, (k, v) in enumerate(sd.items()) if i % 7},
             "s24": lambda: timm.create_model("mz_poolformerv2_s24").state_dict(),
             "foo": lambda: {"foo.weight": torch.zeros(3)},
             "unrelated": lambda: {"encoder.layer.0.weight": torch.zeros(4, 4)}}
    path = tmp_path / f"{case}.safetensors"
    save_file(files[case](), path)
    with pytest.raises(ValueError, match=f"(?s)checkpoint {path} does not fit {TINY_MODEL}.*{match}"):
        create_with_weights(TINY_MODEL, path, num_classes=6)


def test_weights_load_strictly_except_a_head_for_other_classes(s12_weights):
    from metazoo.backbones._common import create_with_weights

    path, sd = s12_weights
    net = create_with_weights(TINY_MODEL, path, num_classes=6)
    assert all(torch.equal(v, sd[k]) for k, v in net.state_dict().items() if not k.startswith("head.fc."))
    assert net.head.fc.weight.shape == (6, 512) and not net.head.fc.weight.any()
    same = create_with_weights(TINY_MODEL, path)
    assert all(torch.equal(v, sd[k]) for k, v in same.state_dict().items())
    with pytest.raises(ValueError, match="size mismatch for head.fc.weight"):  # validation: no head swap
        create_with_weights(TINY_MODEL, path, num_classes=6, head_may_differ=False)


def test_train_and_validate_refuse_unfitting_weights(tmp_path, capsys):
    """`model.checkpoint=unrelated.safetensors` used to train from random weights; validate printed a top-1."""
    from metazoo.train.app import build_model
    from metazoo.train.distributed import DistEnv
    from metazoo.train.evaluate import main as validate_main

    bad = tmp_path / "unrelated.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, bad)
    cfg = compose(f"model.name={TINY_MODEL}", f"model.checkpoint={bad}")
    with pytest.raises(RunError, match=f"'model.checkpoint': checkpoint {bad} does not fit"):
        build_model(cfg, 6, DistEnv(0, 0, 1, torch.device("cpu")))
    root = image_folder(tmp_path / "data", {"val": {"a": 1, "b": 1}})
    with pytest.raises(SystemExit) as exit_info:
        validate_main([str(root), "--model", TINY_MODEL, "--checkpoint", str(bad), "--workers", "0"])
    assert exit_info.value.code == 2 and str(bad) in capsys.readouterr().err


def test_resume_config_changes_are_refused_or_applied():
    from metazoo.train.resume import check_resume

    saved = {"model": {"name": "a", "kwargs": {}}, "optim": {"lr": 1e-3, "name": "adamw"}, "epochs": 3,
             "data": {"root": "/d", "workers": 2}, "ckpt": {"resume": "auto"}}
    new = json.loads(json.dumps(saved))
    new["optim"]["lr"], new["epochs"], new["data"]["workers"], new["ckpt"]["resume"] = 0.05, 5, 0, None
    assert check_resume("ck", saved, new, 8, 8) == ["data.workers: 2 -> 0", "epochs: 3 -> 5", "optim.lr: 0.001 -> 0.05"]
    for key, value in (("model", {"name": "b", "kwargs": {}}), ("data", {"root": "/e", "workers": 2})):
        changed = dict(saved, **{key: value})
        with pytest.raises(RunError, match=f"'{key}\\.(name|root)': resuming ck with a changed"):
            check_resume("ck", saved, changed, 8, 8)
    with pytest.raises(RunError, match="'optim.global_batch'.*8 -> 16"):
        check_resume("ck", saved, saved, 8, 16)


@pytest.mark.slow
def test_resume_applies_new_lr_and_epochs_and_refuses_a_new_model(tmp_path, cache):
    """Before: `epochs=2 optim.lr=...` on a finished run printed the new lr but trained at the restored one;
    a changed `model.name` died in a size-mismatch traceback."""
    run_dir = tmp_path / "run"
    base = tiny_overrides(cache, "epochs=1", "sched.name=constant", "sched.warmup_epochs=0", "data.shapes_train_per_class=2",
                          "data.shapes_val_per_class=1")
    assert run(train_cmd(run_dir, base)).returncode == 0
    out = run(train_cmd(run_dir, [*base, "epochs=2", "optim.lr=5e-3"]))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "config changes applied" in out.stdout and "optim.lr: 0.002 -> 0.005" in out.stdout
    second = metrics(run_dir)["epochs"][1]
    assert second["epoch"] == 1 and [s["lr"] for s in second["steps"]] == pytest.approx([5e-3] * len(second["steps"]))
    out = run(train_cmd(run_dir, [*base, "epochs=3", "model.name=mz_poolformerv2_s24"]))
    assert out.returncode == 2 and "config key 'model.name': resuming" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_diverging_run_stops_without_a_checkpoint(tmp_path, cache):
    """Before: `optim.lr=1e6` gave NaN losses, exit 0 and a NaN checkpoint."""
    run_dir = tmp_path / "run"
    out = run(train_cmd(run_dir, tiny_overrides(cache, "epochs=1", "optim.lr=1e6", "data.shapes_train_per_class=4",
                                                "data.shapes_val_per_class=1")))
    assert out.returncode == 2 and "training diverged" in out.stderr and "'optim.lr'" in out.stderr
    assert list_checkpoints(run_dir / "checkpoints") == []
    assert not (run_dir / ".metazoo.lock").exists()  # released on the error path


def _nan_epoch(max_nonfinite: int, bad_batches: set[int]):
    from metazoo.train.distributed import DistEnv
    from metazoo.train.engine import StepContext, train_one_epoch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.full((2, 4), float("nan")) if i in bad_batches else torch.randn(2, 4), torch.tensor([0, 1]))
               for i in range(4)]
    ctx = StepContext(model, opt, None, torch.nn.CrossEntropyLoss(), 1, None, None, None, None, None,
                      DistEnv(0, 0, 1, torch.device("cpu")), 1, max_nonfinite_steps=max_nonfinite)
    stats, steps = train_one_epoch(model, batches, ctx, 0, 0)
    return model, stats, steps


def test_non_finite_steps_are_skipped_up_to_the_limit():
    model, stats, steps = _nan_epoch(1, {1})
    assert steps == 3 and np.isfinite(stats["train_loss"]) and torch.isfinite(model.weight).all()
    with pytest.raises(RunError, match="training diverged: loss nan at epoch 1, optimizer step 2"):
        _nan_epoch(1, {1, 2})
    with pytest.raises(RunError, match="training diverged.*'max_nonfinite_steps'"):
        _nan_epoch(0, {1})


def test_second_run_on_a_locked_dir_fails_naming_the_holder(tmp_path):
    import socket

    from metazoo.train.runlock import RunLock

    with RunLock(tmp_path):
        message = tmp_path / "message.txt"
        pid = os.fork()
        if pid == 0:  # a second process on the same run dir
            try:
                RunLock(tmp_path).acquire()
            except RunError as err:
                message.write_text(str(err))
                os._exit(2)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 2
        text = message.read_text()
        assert f"in use by PID {os.getpid()} on host {socket.gethostname()}" in text and "'hydra.run.dir'" in text
        message.unlink()
    assert not (tmp_path / ".metazoo.lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".metazoo.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with RunLock(tmp_path) as lock:  # stale lock of a dead PID on this host: taken over
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    (tmp_path / ".metazoo.lock").write_text(json.dumps({"pid": dead.pid, "host": "elsewhere"}))
    with pytest.raises(RunError, match="host elsewhere"):  # another host's PID is never guessed about
        RunLock(tmp_path).acquire()


# --- late or unclear (before: a failure after work, or a traceback not naming the cause) ---------------------


def test_unknown_tag_is_refused_before_data_generation():
    with pytest.raises(RunError, match="'model.name': unknown pretrained tag 'nosuch'.*accepted tags"):
        check_config(compose("model.name=mz_caformer_s18.nosuch"))
    check_config(compose("model.name=mz_caformer_s18.sail_in1k"))


def test_empty_image_folder_names_the_split(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(RunError, match="'data.train_split'.*holds no images"):
        scan_split(str(tmp_path), "train", "data.train_split")


def test_corrupt_image_is_an_error_or_skipped_and_counted(tmp_path, capsys):
    from metazoo.train.data import ImageFiles

    root = image_folder(tmp_path, {"train": {"a": 3}})
    bad = root / "train" / "a" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    samples = scan_split(str(root), "train", "data.train_split").samples
    with pytest.raises(RunError, match=f"cannot read image {bad}.*'data.skip_corrupt=true'"):
        ImageFiles(samples, None)[1]
    skipping = ImageFiles(samples, None, skip_corrupt=True)
    assert [skipping[i][0].size for i in range(3)] == [(32, 32)] * 3
    assert len(skipping.skipped) == 1 and f"skipped unreadable image {bad}" in capsys.readouterr().err


def test_image_size_below_the_model_stride_is_refused():
    with pytest.raises(RunError, match="'data.img_size': 8 is below 32.*accepted: >= 32"):
        check_img_size(compose(f"model.name={TINY_MODEL}", "data.img_size=8"))
    check_img_size(compose(f"model.name={TINY_MODEL}", "data.img_size=32"))


def test_num_classes_below_the_folder_count_is_refused(tmp_path):
    root = image_folder(tmp_path, {"train": {c: 1 for c in "abcdef"}})
    train = scan_split(str(root), "train", "data.train_split")
    with pytest.raises(RunError, match="'data.num_classes': 3 is fewer than the 6 class folders"):
        check_classes(train, train, 3)
    assert check_classes(train, train, 8) == 8


@pytest.mark.parametrize("name,content", [("trunc.safetensors", None), ("empty.safetensors", b""),
                                          ("garbage.pth", b"not a checkpoint" * 4)])
def test_unreadable_weights_files_are_named(tmp_path, s12_weights, name, content):
    import pickle

    from metazoo.backbones._common import load_checkpoint as load_weights

    path = tmp_path / name
    path.write_bytes(s12_weights[0].read_bytes()[:4000] if content is None else content)
    with pytest.raises((ValueError, pickle.UnpicklingError), match=f"checkpoint {path}"):
        load_weights(path)


def test_resume_falls_back_to_the_last_intact_checkpoint(tmp_path):
    w = {"w": torch.arange(4.0)}
    for epoch in range(2):
        save_checkpoint(tmp_path, epoch, w, {"epoch": epoch})
    newest = tmp_path / "epoch_0001" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:20])
    with pytest.raises(ValueError, match=f"checkpoint {newest} cannot be read"):
        load_training_state(tmp_path / "epoch_0001")
    said = []
    path, (model, _, state) = load_latest_intact(tmp_path, report=said.append)
    assert path.name == "epoch_0000" and state["epoch"] == 0 and torch.equal(model["w"], w["w"])
    assert "epoch_0001 is unreadable" in said[0] and (tmp_path / "epoch_0001").exists()


def test_unwritable_dirs_fail_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunError, match=f"'ckpt.dir': folder {blocker / 'ck'} is not writable"):
        probe_writable(blocker / "ck", "ckpt.dir")
    probe_writable(tmp_path / "ok", "ckpt.dir")
    assert [p.name for p in (tmp_path / "ok").iterdir()] == []


def test_failed_save_names_the_path_and_keeps_the_previous(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 0, {"w": torch.zeros(2)}, {"epoch": 0})

    def full_disk(*args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=f"saving checkpoint {tmp_path / 'epoch_0001'} failed while writing .*state.pt"):
        save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {"epoch": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_0000"]


def test_dense_apps_refuse_added_keys_missing_files_and_unwritable_dirs(tmp_path):
    """The detection / segmentation apps: `+key` outside the free-form mm sections, a missing weights
    file, and an unwritable work dir fail before any data or model is built (no OpenMMLab needed)."""
    from omegaconf import OmegaConf

    from metazoo.train.preflight import check_added_keys, check_dense_paths

    check_added_keys(["seed=1", "+mm.train_cfg.max_iters=2", "backbone.model_name=x"], ("mm.", "mm_base."))
    with pytest.raises(RunError, match="'backbone.frozen_stagez': not a key"):
        check_added_keys(["+backbone.frozen_stagez=1"], ("mm.", "mm_base."))
    cfg = OmegaConf.create({"load_from": str(tmp_path / "nope.pth"), "work_dir": str(tmp_path / "w"),
                            "backbone": {"checkpoint": "sail_in1k", "model_name": "mz_poolformer_s12"}})
    with pytest.raises(RunError, match=f"'load_from': file not found: {tmp_path / 'nope.pth'}"):
        check_dense_paths(cfg)
    cfg.load_from = None
    check_dense_paths(cfg)  # a pretrained tag of the backbone
    cfg.backbone.checkpoint = "sail_in2k"
    with pytest.raises(RunError, match="'backbone.checkpoint': unknown pretrained tag 'sail_in2k'"):
        check_dense_paths(cfg)
    cfg.backbone.checkpoint = "weights.pth"
    with pytest.raises(RunError, match="'backbone.checkpoint': file not found: weights.pth"):
        check_dense_paths(cfg)
    cfg.backbone.checkpoint = None
    (tmp_path / "file").write_text("")
    cfg.work_dir = str(tmp_path / "file" / "w")
    with pytest.raises(RunError, match="'work_dir': folder .* is not writable"):
        check_dense_paths(cfg)
