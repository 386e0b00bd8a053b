"""Knowledge distillation for the training command (config group ``distill``).

The teacher is any timm or ``mz_`` model (``name`` or ``name.tag`` with ``pretrained``, or a local
weights file), kept outside DDP, in eval mode, without gradients, and run under the student's
autocast on the same (augmented, mixed) batch. The loss is

    label_weight * task_loss + kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T))
    + imitation_in * sum_blocks MSE(student block output, teacher block output)
    + imitation_out * sum_blocks MSE(student mixer output, teacher mixer output)

The last two are RIFormer's module imitation (Wang et al., CVPR 2023, section "Module imitation"):
each student block learns from the teacher block in the same position. ``imitation_in`` is the
paper's L'_in: it matches the mixers' inputs LN(T^m) through the block outputs T^(m+1) (the next
block's input before its norm), as the paper simplifies L_in; ``imitation_out`` is its L_out, the
affine mixer's output f(LN(T^m)) against the teacher mixer's g(LN(T^m)). The paper writes both as
squared Frobenius norms with weights alpha; here each is divided by the number of elements (a mean
squared error, so one weight suits every width and resolution). Its third term L_rel, on relation
matrices of the block outputs, is not implemented. Module imitation needs a teacher with the student's
block layout (the same number of blocks with ``token_mixer`` modules and the same widths).
``init_student`` copies every teacher tensor whose name and shape match into the student, token
mixers excepted (the paper initialises the student from the teacher's weights except the token mixers).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DistillConfig:
    enabled: bool = False
    teacher: Optional[str] = None  # timm or mz_ model name, optionally with a pretrained tag (name.tag)
    pretrained: bool = True  # load the teacher's published weights (ignored when checkpoint is set)
    checkpoint: Optional[str] = None  # teacher weights file (safetensors or weights-only .pth)
    temperature: float = 1.0
    kd_weight: float = 1.0
    label_weight: float = 1.0  # 0: pure soft distillation (no ground-truth term)
    imitation_in: float = 0.0  # RIFormer's L'_in: block outputs
    imitation_out: float = 0.0  # RIFormer's L_out: token-mixer outputs
    init_student: bool = False  # copy the teacher's tensors (name and shape match) except its token mixers


def _bad(key: str, msg: str) -> ValueError:
    return ValueError(f"config key 'distill.{key}': {msg}")


def check_distill(d) -> None:
    """``ValueError`` naming the ``distill.*`` key for values that would fail later."""
    import timm

    if not d.enabled:
        return
    if not d.teacher or not timm.is_model(d.teacher.split(".")[0]):
        raise _bad("teacher", f"got {d.teacher!r}; accepted: a timm or mz_ model name, e.g. mz_poolformer_s12.sail_in1k")
    if d.checkpoint is not None and not os.path.isfile(os.path.expanduser(d.checkpoint)):
        raise _bad("checkpoint", f"file not found: {d.checkpoint}")
    if not d.temperature > 0:
        raise _bad("temperature", f"must be > 0, got {d.temperature}")
    for key in ("kd_weight", "label_weight", "imitation_in", "imitation_out"):
        if d[key] < 0:
            raise _bad(key, f"must be >= 0, got {d[key]}")


def build_teacher(d, num_classes: int, device: torch.device) -> nn.Module:
    """The frozen teacher: eval mode, no parameter needs grad, on ``device``."""
    import timm

    import metazoo  # noqa: F401  (registers the mz_* models)

    if d.checkpoint is not None:  # a teacher trained on these classes (e.g. by this command)
        overlay = dict(file=os.path.expanduser(d.checkpoint), num_classes=num_classes)
        teacher = timm.create_model(d.teacher, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay)
    elif d.pretrained:
        teacher = timm.create_model(d.teacher, pretrained=True)
    else:  # a fixed random teacher (seeded like the student)
        teacher = timm.create_model(d.teacher, num_classes=num_classes)
    if teacher.num_classes != num_classes:
        raise _bad("teacher", f"{d.teacher} predicts {teacher.num_classes} classes, the data has {num_classes}; "
                              f"accepted: a teacher trained on the same classes (distill.checkpoint)")
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


class _MixerTaps:
    """Forward hooks that keep each block's output and its token mixer's output of the latest forward."""

    def __init__(self, model: nn.Module, training_only: bool):
        from ..backbones.metaformer import MetaFormerBlock

        self.training_only = training_only  # the student's evaluation forwards are not recorded

        self.blocks: list[torch.Tensor] = []
        self.mixers: list[torch.Tensor] = []
        self.count = 0
        for m in model.modules():
            if isinstance(m, MetaFormerBlock):
                m.unfuse()  # fused paths never call the mixer module: the hooks would not fire
            mixer = getattr(m, "token_mixer", None)
            if isinstance(mixer, nn.Module):
                m.register_forward_hook(self._hook(self.blocks))
                mixer.register_forward_hook(self._hook(self.mixers))
                self.count += 1

    def _hook(self, into: list):
        def hook(module, args, output) -> None:
            if module.training or not self.training_only:
                into.append(output)
        return hook

    def take(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Block outputs and mixer outputs of the latest forward (the last ``count`` of each:
        activation-checkpoint replays come earlier)."""
        out = (self.blocks[-self.count:], self.mixers[-self.count:])
        self.blocks.clear()  # in place: the hooks hold these lists
        self.mixers.clear()
        return out


class Distiller:
    """Teacher plus loss; ``loss`` replaces the task loss in the training step."""

    def __init__(self, d, student: nn.Module, num_classes: int, device: torch.device):
        self.cfg = d
        self.teacher = build_teacher(d, num_classes, device)
        if d.init_student:
            self._init_student(student)
        self.imitate = d.imitation_in > 0 or d.imitation_out > 0
        if self.imitate:
            self.student_taps, self.teacher_taps = _MixerTaps(student, True), _MixerTaps(self.teacher, False)
            if self.student_taps.count == 0 or self.student_taps.count != self.teacher_taps.count:
                raise _bad("teacher", f"module imitation needs the student's block layout: the student has "
                                      f"{self.student_taps.count} token mixers, {d.teacher} has {self.teacher_taps.count}")
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # kd, imitation, samples

    @torch.no_grad()
    def _init_student(self, student: nn.Module) -> None:
        ref = student.state_dict()
        copied = {k: v for k, v in self.teacher.state_dict().items()
                  if k in ref and ref[k].shape == v.shape and ".token_mixer." not in k}
        if not copied:
            raise _bad("init_student", f"no tensor of {self.cfg.teacher} matches the student by name and shape")
        student.load_state_dict(copied, strict=False)

    def loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, task_loss: nn.Module) -> torch.Tensor:
        """Called inside the step's autocast, after the student's forward produced ``logits``."""
        d = self.cfg
        with torch.no_grad():
            t_logits = self.teacher(x)
        T = d.temperature
        kd = F.kl_div(F.log_softmax(logits.float() / T, -1), F.log_softmax(t_logits.float() / T, -1),
                      reduction="batchmean", log_target=True) * (T * T)
        total = d.kd_weight * kd
        if d.label_weight > 0:
            total = total + d.label_weight * task_loss(logits, y)
        imitation = torch.zeros((), device=logits.device)
        if self.imitate:
            (s_blk, s_mix), (t_blk, t_mix) = self.student_taps.take(), self.teacher_taps.take()
            for w, s, t in ((d.imitation_in, s_blk, t_blk), (d.imitation_out, s_mix, t_mix)):
                if w > 0:
                    imitation = imitation + w * sum(F.mse_loss(a.float(), b.float()) for a, b in zip(s, t))
            total = total + imitation
        n = x.shape[0]  # summed on device: no per-step host sync
        self.sums[0] += kd.detach().double() * n
        self.sums[1] += imitation.detach().double() * n
        self.sums[2] += n
        return total

    def epoch_stats(self, dist) -> dict:
        """Sample-weighted means over every rank since the last call: ``kd_loss``, ``imitation_loss``."""
        kd, imitation, n = dist.all_reduce_sum(self.sums.tolist())
        self.sums.zero_()
        n = max(n, 1)
        return {"kd_loss": kd / n, "imitation_loss": imitation / n}
