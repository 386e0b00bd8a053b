"""ViM2 (Behrouz, Santacatterina, Zabih, "MambaMixer: Efficient Selective State Space Models with
Dual Token and Channel Selection", arXiv 2403.19888): a four-stage network of selective token
mixers (four cross-scans) and selective channel mixers, joined inside each stage by learned
weighted averages of all earlier outputs. The paper releases no code and no weights; the readings
chosen where it is ambiguous are listed in ``model_cards/vim2_choices.md``.
"""
from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import generate_default_cfgs
from timm.models._manipulate import checkpoint
from torch import nn

from ..mixers.mambamixer import SelectiveChannelMixer, SelectiveTokenMixer
from ..layers.norms import LayerNorm
from ._common import build, register_family
from ._layers import NormPoolHead, PatchifyStem, SepConvDownsample
from .metaformer import MetaFormer

# dims, token mixers and channel mixers per stage (paper table); block width (token-mixer
# expansion and channel-mixer width, in units of dim) per stage: 2, 2, 2, 1.
VARIANTS = {  # size: ViM2 arguments
    "t": dict(dims=(96, 192, 384, 768), token_mixers=(2, 2, 6, 2), channel_mixers=(1, 1, 3, 1)),
    "s": dict(dims=(96, 192, 384, 768), token_mixers=(2, 2, 18, 2), channel_mixers=(1, 1, 9, 1)),
    "b": dict(dims=(128, 256, 512, 1024), token_mixers=(2, 2, 18, 2), channel_mixers=(1, 1, 9, 1)),
}
WIDTHS = (2.0, 2.0, 2.0, 1.0)


class ResidualMixer(nn.Module):
    """``x + drop_path(mixer(norm(x)))``: one token or channel mixer with its pre-norm residual."""

    def __init__(self, dim: int, mixer: nn.Module, drop_path: float = 0.0):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.mixer = mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NHWC."""
        return x + self.drop_path(self.mixer(self.norm(x)))


def mixer_order(token_mixers: int, channel_mixers: int) -> list[str]:
    """'t'/'c' sequence of one stage: channel mixers spread evenly, each after its token mixers."""
    if channel_mixers > token_mixers or token_mixers < 1:
        raise ValueError(f"a stage needs token_mixers >= max(1, channel_mixers); got {token_mixers}, {channel_mixers}")
    order = []
    for i in range(token_mixers):
        order.append("t")
        if channel_mixers and (i + 1) * channel_mixers // token_mixers > i * channel_mixers // token_mixers:
            order.append("c")
    return order


class WeightedAverageStack(nn.Module):
    """One ViM2 stage body: each mixer's input is a learned weighted sum of the stage input and
    every earlier mixer output (one scalar per pair: the paper's α, β, θ, γ). Initialised with
    weight 1 on the latest output and 0 elsewhere, i.e. a plain residual stack."""

    def __init__(self, dim: int, order: list[str], width: float, drop_paths: list[float], d_state: int = 16,
                 proj_drop: float = 0.0):
        super().__init__()
        self.layout = "NHWC"
        self.grad_checkpointing = False
        mixers = []
        for kind, dp in zip(order, drop_paths):
            if kind == "t":
                m = SelectiveTokenMixer(dim, expand=width, d_state=d_state, proj_drop=proj_drop)
            else:
                m = SelectiveChannelMixer(dim, width=int(width * dim), d_state=d_state, proj_drop=proj_drop)
            mixers.append(ResidualMixer(dim, m, dp))
        self.mixers = nn.ModuleList(mixers)
        self.avg_weights = nn.ParameterList(
            [nn.Parameter(torch.cat([torch.zeros(k), torch.ones(1)])) for k in range(len(order))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NHWC."""
        outs = [x]
        for w, mixer in zip(self.avg_weights, self.mixers):
            inp = outs[0] * w[0]
            for j in range(1, len(outs)):
                inp = inp + outs[j] * w[j]
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                outs.append(checkpoint(mixer, inp))
            else:
                outs.append(mixer(inp))
        return outs[-1]


class ViM2(MetaFormer):
    """ViM2 on the MetaFormer skeleton: 4x4 patchify stem, four NHWC stages (one
    :class:`WeightedAverageStack` each), separable-conv downsampling, norm + GAP + linear head."""

    block_groups = [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.0\.mixers\.(\d+)", None)]

    def __init__(self, dims=(96, 192, 384, 768), token_mixers=(2, 2, 6, 2), channel_mixers=(1, 1, 3, 1),
                 widths=WIDTHS, d_state: int = 16, drop_path_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 **kwargs):
        if "depths" in kwargs:
            raise ValueError("ViM2 takes no depths: its stage depths are token_mixers and channel_mixers "
                             f"(S6 token / channel mixers per stage), got depths={kwargs['depths']}")
        orders = [mixer_order(t, c) for t, c in zip(token_mixers, channel_mixers)]
        total = sum(len(o) for o in orders)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        starts = [sum(len(o) for o in orders[:i]) for i in range(len(orders))]
        block_kwargs = [dict(order=o, width=w, d_state=d_state, proj_drop=proj_drop_rate,
                             drop_paths=rates[s:s + len(o)]) for o, w, s in zip(orders, widths, starts)]
        super().__init__(depths=(1,) * len(dims), dims=dims, stem_layer=PatchifyStem,
                         downsample_layer=SepConvDownsample, head_layer=NormPoolHead,
                         block_layer=_stack_block, block_kwargs=block_kwargs, output_fmt="NHWC", **kwargs)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every mixer (not whole stages), so the weighted averages stay cheap."""
        self.grad_checkpointing = False
        for s in self.stages:
            for block in s.blocks:
                block.grad_checkpointing = enable


def _stack_block(dim: int, drop_path: float, **kwargs) -> WeightedAverageStack:
    """MetaFormer ``block_layer`` adapter: the stage body ignores the per-block rate it is given."""
    del drop_path
    return WeightedAverageStack(dim, **kwargs)


def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "stem.conv", "classifier": "head.fc", "license": "apache-2.0", **kwargs}


default_cfgs = generate_default_cfgs({f"mz_vim2_{s}": _cfg() for s in VARIANTS})


def _create(variant: str, pretrained: bool, **kwargs):
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and not any(overlay.get(k) for k in ("file", "url", "hf_hub_id", "state_dict")):
        raise RuntimeError(f"{variant}: no pretrained ViM2 weights exist (the paper released none); "
                           "use pretrained=False, or pass pretrained_cfg_overlay=dict(file=<your checkpoint>)")
    return build(ViM2, variant, pretrained, **kwargs)


register_family(__name__, VARIANTS, _create)
