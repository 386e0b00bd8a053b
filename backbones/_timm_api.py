"""timm's model API written once for every family: ``TimmBackboneMixin``.

A family class inherits it (before ``nn.Module``) and provides ``stem`` (image -> stage-0 input),
``stages`` (``nn.Sequential``; a stage with a ``grad_checkpointing`` flag checkpoints its blocks),
``head`` (``forward(x, pre_logits)``, ``reset(num_classes, pool_type, reset_other)``, ``fc``,
``num_features``), ``head_layer`` (``head_layer(dim, num_classes, pool_type=)``, rebuilds the head
after pruning), ``feature_info``, ``num_classes``, ``num_features``, ``head_hidden_size``,
``grad_checkpointing`` and, for channels-last stages, ``output_fmt = "NHWC"``. Families whose
module layout is fixed by official checkpoints override the hooks ``_forward_stages``,
``_num_stages``, ``_keep_stages`` and ``_forward_final`` instead.
"""
from __future__ import annotations

import re

import torch
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from torch import nn

from ._common import like_model

OUTPUT_FMTS = ("NCHW", "NHWC")


class TimmBackboneMixin:
    """group_matcher, no_weight_decay, set_grad_checkpointing, get/reset_classifier, forward_intermediates,
    prune_intermediate_layers, forward_features/head from the attributes in the module docstring."""

    stem_group = r"^stem"  # parameter groups for layer-wise lr decay (timm's group_matcher)
    block_groups: str | list = [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)]
    coarse_block_groups: str | list = r"^stages\.(\d+)"
    no_weight_decay_pattern: str | None = None  # None: every 1-D parameter (scales, norms, biases)

    # ---- hooks ---------------------------------------------------------------------------
    def _num_stages(self) -> int:
        return len(self.stages)

    def _forward_stages(self, x: torch.Tensor, last: int, take: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image -> output of stage ``last``, plus the outputs of the stages in ``take``."""
        x = self.stem(x)
        taken = []
        for i, stage in enumerate(self.stages):  # no break: TorchScript unrolls this loop
            if i <= last:
                x = checkpoint(stage, x) if self.grad_checkpointing and not torch.jit.is_scripting() else stage(x)
                if i in take:
                    taken.append(x)
        return x, taken

    def _keep_stages(self, n: int) -> None:
        self.stages = self.stages[:n]

    def _forward_final(self, x: torch.Tensor) -> torch.Tensor:
        """Layers between the last stage and the head (none by default)."""
        return x

    # ---- timm model API ------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=self.stem_group, blocks=self.coarse_block_groups if coarse else self.block_groups)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay (``no_weight_decay_pattern``, else the 1-D ones)."""
        pattern = self.no_weight_decay_pattern
        return {n for n, p in self.named_parameters() if (re.search(pattern, n) if pattern else p.ndim <= 1)}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for s in getattr(self, "stages", ()):
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, reset_other: bool = False) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, reset_other=reset_other)
        like_model(self.head, self)
        self.head_hidden_size = self.head.num_features

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Final features plus the stage outputs picked by ``indices`` (timm semantics; ``norm``: no-op)."""
        if output_fmt not in OUTPUT_FMTS:
            raise ValueError(f"output_fmt={output_fmt!r}; accepted: {', '.join(map(repr, OUTPUT_FMTS))}")
        n = self._num_stages()
        take_indices, max_index = feature_take_indices(n, indices)
        last = max_index if stop_early or intermediates_only else n - 1
        x, intermediates = self._forward_stages(x, last, take_indices)
        native = getattr(self, "output_fmt", "NCHW")
        if native != output_fmt:
            perm = (0, 3, 1, 2) if native == "NHWC" else (0, 2, 3, 1)
            intermediates = [y.permute(*perm).contiguous() for y in intermediates]
        if intermediates_only:
            return intermediates
        return (self._forward_final(x) if last == n - 1 else x), intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        """Drop the stages after the last one ``indices`` needs (and the head)."""
        n = self._num_stages()
        take_indices, max_index = feature_take_indices(n, indices)
        prune_end = max_index < n - 1
        self._keep_stages(max_index + 1)
        if prune_end:
            self.num_features = self.feature_info[max_index]["num_chs"]
            if self.head_layer is not None:
                self.head = like_model(self.head_layer(self.num_features, 0, pool_type="avg"), self)
        if prune_head or prune_end:
            self.reset_classifier(0, "", reset_other=True)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (NCHW) -> last-stage features in the model's layout."""
        x, _ = self._forward_stages(x, self._num_stages() - 1, [])
        return self._forward_final(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
