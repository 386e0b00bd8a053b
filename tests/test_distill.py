"""Knowledge distillation in the training command: config checks, the loss terms, and an end-to-end
run (teacher trained first on the shapes set, RIFormer student with module imitation) whose KD loss
falls and which resumes exactly after SIGKILL."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import metazoo  # noqa: F401
from metazoo.train.distill import Distiller
from metazoo.train.distributed import DistEnv
from test_train import ENV, cache, compose, kill_and_resume, metrics, run_ok, tiny_overrides, train_cmd  # noqa: F401


@pytest.mark.parametrize("override,key", [
    ("distill.teacher=not_a_model", "distill.teacher"),
    ("distill.temperature=0", "distill.temperature"),
    ("distill.kd_weight=-1", "distill.kd_weight"),
    ("distill.checkpoint=/does/not/exist.safetensors", "distill.checkpoint"),
])
def test_bad_distill_values_name_the_key(override, key):
    from metazoo.train.config import check_config

    base = ["distill=kd", "distill.teacher=mz_poolformer_s12"]
    with pytest.raises(ValueError, match=f"'{key}'"):
        check_config(compose(*base, override))


def test_riformer_recipe_composes():
    from metazoo.train.config import check_config

    cfg = compose("recipe=riformer", "data.root=/tmp")
    check_config(cfg)
    assert cfg.distill.enabled and cfg.distill.label_weight == 0 and cfg.distill.imitation_out > 0
    assert (cfg.model.name, cfg.optim.clip_grad, cfg.sched.warmup_epochs) == ("mz_riformer_s12", 5.0, 20)
    assert {v["drop_path_rate"] for v in cfg.per_model.values()} == {0.1}  # mmpretrain's configs, every size


def test_riformer_recipe_teacher_pairs_every_block():
    """The preset's teacher (its architecture; published weights not fetched) has the student's block layout:
    module imitation pairs all twelve blocks and init_student fills every student tensor but the mixers'."""
    cfg = compose("recipe=riformer", "data.root=/tmp", "distill.pretrained=false")
    student = timm.create_model(cfg.model.name)
    dist = Distiller(cfg.distill, student, 1000, torch.device("cpu"))
    assert dist.student_taps.count == dist.teacher_taps.count == 12
    ref = dist.teacher.state_dict()
    mixers = {k for k in student.state_dict() if ".token_mixer." in k}
    assert len(mixers) == 24 and not mixers & set(ref)
    assert all(torch.equal(v, ref[k]) for k, v in student.state_dict().items() if k not in mixers)


def _distiller(**kw):
    d = compose("distill=kd", "distill.teacher=mz_poolformer_s12", "distill.pretrained=false",
                *[f"distill.{k}={v}" for k, v in kw.items()]).distill
    student = timm.create_model("mz_riformer_s12", num_classes=5)
    return Distiller(d, student, 5, torch.device("cpu")), student


def _tap(model):
    """Lists that collect every block's output and its token mixer's output on the next forwards."""
    blocks, mixers = [], []
    for stage in model.stages:
        for block in stage.blocks:
            block.register_forward_hook(lambda m, a, o: blocks.append(o))
            block.token_mixer.register_forward_hook(lambda m, a, o: mixers.append(o))
    return blocks, mixers


def test_loss_terms_against_their_definitions():
    """KD term = T^2 KL(teacher || student) at temperature T; module imitation = summed MSE over the
    twelve blocks' outputs (L'_in) and mixer outputs (L_out); the teacher is frozen and outside autograd."""
    dist, student = _distiller(temperature=2.0, kd_weight=0.5, label_weight=0.25, imitation_in=0.3,
                               imitation_out=0.7, init_student="true")
    teacher = dist.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert torch.equal(student.stages[2].blocks[0].mlp.fc1.weight, teacher.stages[2].blocks[0].mlp.fc1.weight)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    student.train()
    s_in, s_out = _tap(student)
    logits = student(x)
    loss = dist.loss(logits, x, y, torch.nn.CrossEntropyLoss())
    t_in, t_out = _tap(teacher)
    with torch.no_grad():
        t_logits = teacher(x)
    assert len(s_in) == len(t_in) == 12
    p_t = F.softmax(t_logits / 2, -1)
    kd = (p_t * (p_t.log() - F.log_softmax(logits / 2, -1))).sum(-1).mean() * 4
    mse = lambda a, b: sum(((u - v) ** 2).mean() for u, v in zip(a, b))  # noqa: E731
    want = 0.5 * kd + 0.25 * F.cross_entropy(logits, y) + 0.3 * mse(s_in, t_in) + 0.7 * mse(s_out, t_out)
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    loss.backward()
    assert student.stages[0].blocks[0].token_mixer.affine.weight.grad.abs().sum() > 0  # imitation reaches it
    stats = dist.epoch_stats(DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert abs(stats["kd_loss"] - kd.item()) <= 1e-5 * kd.item()


def test_teacher_runs_under_the_students_autocast():
    dist, student = _distiller()
    seen = []
    dist.teacher.head.fc.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = student(x)
        loss = dist.loss(logits, x, torch.tensor([0, 1]), torch.nn.CrossEntropyLoss())
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32 and torch.isfinite(loss)


def test_module_imitation_needs_the_block_layout():
    with pytest.raises(ValueError, match="'distill.teacher'"):
        d = compose("distill=kd", "distill.teacher=mz_mambaout_femto", "distill.pretrained=false",
                    "distill.imitation_out=1").distill
        Distiller(d, timm.create_model("mz_riformer_s12", num_classes=5), 5, torch.device("cpu"))


def test_module_imitation_equals_its_closed_form():
    """RIFormer teacher and student with a = 1 in every affine mixer (mixer output = its bias c, whatever
    the input) and the mixer branch switched off (layer scale 0) except in the last block, whose MLP
    branch is off: the blocks agree up to the last, which differs by s * (c_s - c_t) per channel. So
    L_out = sum over blocks of mean_channels (c_s - c_t)^2, L'_in = mean_channels (s * (c_s - c_t))^2."""
    d = compose("distill=kd", "distill.teacher=mz_riformer_s12", "distill.pretrained=false", "distill.kd_weight=0",
                "distill.label_weight=0", "distill.imitation_in=0.3", "distill.imitation_out=0.7",
                "distill.init_student=true").distill
    torch.manual_seed(0)
    student = timm.create_model("mz_riformer_s12", num_classes=5)
    dist = Distiller(d, student, 5, torch.device("cpu"))
    s_mixer, t_mixer = student.stages[0].blocks[0].token_mixer.affine, dist.teacher.stages[0].blocks[0].token_mixer.affine
    assert not torch.equal(s_mixer.weight, t_mixer.weight)  # init_student leaves the token mixers alone
    assert torch.equal(student.stages[0].blocks[0].mlp.fc1.weight, dist.teacher.stages[0].blocks[0].mlp.fc1.weight)
    blocks = [(bs, bt) for ss, st in zip(student.stages, dist.teacher.stages) for bs, bt in zip(ss.blocks, st.blocks)]
    scale = torch.rand(512) + 0.5
    want_out = 0.0
    with torch.no_grad():
        for i, (bs, bt) in enumerate(blocks):
            for b in (bs, bt):
                b.token_mixer.affine.weight.fill_(1.0)
                b.token_mixer.affine.bias.normal_()
                b.layer_scale1.scale.copy_(scale if i == len(blocks) - 1 else torch.zeros_like(b.layer_scale1.scale))
                if i == len(blocks) - 1:
                    b.layer_scale2.scale.zero_()
            want_out += ((bs.token_mixer.affine.bias - bt.token_mixer.affine.bias) ** 2).mean().item()
    last_s, last_t = blocks[-1][0].token_mixer.affine.bias, blocks[-1][1].token_mixer.affine.bias
    want_in = ((scale * (last_s - last_t)) ** 2).mean().item()
    student.train()
    want = 0.3 * want_in + 0.7 * want_out
    assert want_in > 0.1 and want_out > 1.0
    for _ in range(2):  # every step's loss sees that step's taps
        x = torch.randn(2, 3, 64, 64)
        loss = dist.loss(student(x), x, torch.tensor([0, 1]), torch.nn.CrossEntropyLoss())
        assert abs(loss.item() - want) <= 1e-5 * want


@pytest.mark.slow
def test_distillation_run_lowers_kd_loss_and_resumes_after_sigkill(tmp_path, cache):  # noqa: F811
    teacher_run = tmp_path / "teacher"
    run_ok(train_cmd(teacher_run, tiny_overrides(cache)))  # mz_poolformerv2_s12, 3 epochs
    teacher_file = teacher_run / "checkpoints" / "epoch_0002" / "model.safetensors"
    overrides = [o for o in tiny_overrides(cache, "epochs=4") if not o.startswith("model.name=")] + [
        "model.name=mz_riformer_s12", "distill=kd", "distill.teacher=mz_poolformerv2_s12",
        f"distill.checkpoint={teacher_file}", "distill.label_weight=0", "distill.imitation_in=1",
        "distill.imitation_out=1", "distill.init_student=true"]
    ref, _ = kill_and_resume(tmp_path, overrides, keys=("kd_loss", "imitation_loss"))
    kd = [r["kd_loss"] for r in metrics(ref)["epochs"]]
    assert kd[-1] < 0.7 * kd[0], kd


@pytest.mark.slow
def test_distillation_under_ddp_matches_single_process(tmp_path, cache):  # noqa: F811
    """Two ranks x 8 vs one process x 16, fixed random teacher (seeded like the student), module
    imitation on: identical per-step losses and KD losses (the teacher stays outside DDP)."""
    common = [o for o in tiny_overrides(cache, "aug=none", "epochs=2", "optim.lr_base_batch=16")
              if not o.startswith("model.name=")] + [
        "model.name=mz_poolformerv2_s12", "distill=kd", "distill.teacher=mz_poolformer_s12", "distill.pretrained=false",
        "distill.temperature=2", "distill.label_weight=0.5", "distill.imitation_out=1"]
    single = tmp_path / "single"
    run_ok(train_cmd(single, common + ["data.batch_size=16"]))
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "metazoo.train", f"hydra.run.dir={ddp}", *common, "data.batch_size=8"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "on 2 x cpu" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    s, d = metrics(single)["epochs"], metrics(ddp)["epochs"]
    s_steps = [x["loss"] for r in s for x in r["steps"]]
    d_steps = [x["loss"] for r in d for x in r["steps"]]
    assert len(s_steps) == len(d_steps) == 6 and len(set(np.round(s_steps, 3))) > 1
    np.testing.assert_allclose(d_steps, s_steps, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([r["kd_loss"] for r in d], [r["kd_loss"] for r in s], rtol=1e-4)
    assert all(r["kd_loss"] > 0 and r["imitation_loss"] > 0 for r in s)
