"""AFFNet (Huang et al., ICCV 2023): MobileNetV2 stages, then AFF stages mixing tokens in the frequency domain.

Family file: the variant table, our module tree (timm style), the official (ml-cvnets) checkpoint
key map, and the ``mz_affnet*`` registrations. Official checkpoints are OneDrive folders, not
direct links: pass a downloaded file with ``pretrained_cfg_overlay=dict(file=...)``.

Network: stem (3x3 s2 conv) -> 2 MobileNetV2 stages -> 3 stages of [MV2 downsample, AFF blocks,
norm, 1x1 projection, 1x1 fusion with the stage input] -> 1x1 expansion conv -> pool -> linear.
An AFF block is ``x + AFF(norm2(MV2(norm1(x))))`` (the MV2 block keeps its own residual).
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from timm.layers import ClassifierHead, ConvNormAct, DropPath, make_divisible
from timm.models._manipulate import checkpoint_seq
from timm.models._registry import generate_default_cfgs
from torch import nn

from metazoo.layers.norms import GroupNorm1
from metazoo.mixers.aff import AFFMixer

from ._common import build, check_input_size, model_name, register_family, unwrap_state_dict
from ._timm_api import TimmBackboneMixin

__all__ = ["AFFNet", "checkpoint_filter_fn", "convert_official", "VARIANTS"]

VARIANTS = {  # size ("" registers mz_affnet): AFFNet arguments; official config name, params, MACs at 256 px
    "et": dict(widths=(32, 48, 64, 104, 144), mv2_expand=2),  # xx_small, 1.4M, 0.4G
    "t": dict(widths=(32, 48, 96, 160, 192), mv2_expand=4),   # x_small, 2.6M, 0.8G
    "": dict(widths=(32, 64, 128, 256, 320), mv2_expand=4),   # small, 5.5M, 1.5G
}
STEM_WIDTH, HEAD_EXPAND, HEAD_MAX = 16, 4, 960
NUM_MV2_STAGES = 2

OFFICIAL_URLS = {model_name("affnet", size): url for size, url in {  # model/log/config folders linked from
    "et": "https://1drv.ms/f/s!AjKVODXuNei2gRohpLEiih31-T24?e=KSOEZ5",  # the official README (microsoft/TokenMixers)
    "t": "https://1drv.ms/f/s!AjKVODXuNei2gR3bxUACGV1s-NCt?e=WrEVTC",
    "": "https://1drv.ms/f/s!AjKVODXuNei2gRckRc6eJ4kB8dW3?e=7comla",
}.items()}
ACT_LAYERS = {"relu": nn.ReLU, "silu": nn.SiLU}


class ChannelLayerNorm(nn.LayerNorm):
    """ml-cvnets' channel-first ``layer_norm``: ``(x - mean_c) / (std_c + eps) * w + b`` on NCHW.

    Note ``std + eps`` (not ``sqrt(var + eps)``): the official AFF blocks normalise this way.
    Statistics in fp32; the output keeps the input dtype (the official one turns a bf16 autocast
    stream into fp32 through its fp32 affine parameters).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW."""
        xf = x.float()
        std, mean = torch.std_mean(xf, dim=1, keepdim=True, unbiased=False)
        y = (xf - mean) / (std + self.eps)
        return torch.addcmul(self.bias.view(1, -1, 1, 1), y, self.weight.view(1, -1, 1, 1)).to(x.dtype)


class Stem(ConvNormAct):
    """3x3 stride-2 conv, BN, act; rejects inputs smaller than the network's total stride (32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW image."""
        if not torch.jit.is_scripting():  # a global int is no TorchScript constant
            check_input_size(x, 32)
        return self.bn(self.conv(x))  # ConvNormAct's forward (no anti-aliasing here); TorchScript has no super()


NORM_LAYERS = {"layer_norm": ChannelLayerNorm, "layer_norm_2d": lambda c: GroupNorm1(c, eps=1e-5)}


class MV2Block(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand -> 3x3 depthwise -> 1x1 project (+ input)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand: float, act_layer: type[nn.Module]):
        super().__init__()
        mid = make_divisible(int(round(in_chs * expand)), 8)
        self.conv_pw = ConvNormAct(in_chs, mid, 1, act_layer=act_layer)
        self.conv_dw = ConvNormAct(mid, mid, 3, stride=stride, groups=mid, act_layer=act_layer)
        self.conv_pwl = ConvNormAct(mid, out_chs, 1, apply_act=False)
        self.has_skip = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW."""
        y = self.conv_pwl(self.conv_dw(self.conv_pw(x)))
        return x + y if self.has_skip else y


class AFFBlock(nn.Module):
    """``x + drop_path(AFF(norm2(MV2(norm1(x)))))``: local mixing by MV2, global by the AFF filter."""

    def __init__(self, dim: int, ffn_ratio: float, norm_layer: Callable, act_layer: type[nn.Module],
                 drop_path: float, mixer_kwargs: dict):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.mlp = MV2Block(dim, dim, 1, ffn_ratio, act_layer)
        self.norm2 = norm_layer(dim)
        self.mixer = AFFMixer(dim, **mixer_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW."""
        return x + self.drop_path(self.mixer(self.norm2(self.mlp(self.norm1(x)))))


class MV2Stage(nn.Module):
    """A stage of MobileNetV2 blocks (the first one strided)."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, stride: int, expand: float, act_layer):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*[MV2Block(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1,
                                               expand, act_layer) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class AFFStage(nn.Module):
    """MV2 downsample, AFF blocks, norm, 1x1 projection, then 1x1 fusion of [stage input, projection]."""

    def __init__(self, in_chs: int, dim: int, depth: int, expand: float, ffn_ratio: float, fuse: bool,
                 norm_layer: Callable, act_layer, drop_path: list[float], mixer_kwargs: dict):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = MV2Block(in_chs, dim, 2, expand, act_layer)
        self.blocks = nn.Sequential(*[AFFBlock(dim, ffn_ratio, norm_layer, act_layer, drop_path[i], mixer_kwargs)
                                      for i in range(depth)])
        self.norm = norm_layer(dim)
        self.proj = ConvNormAct(dim, dim, 1, apply_act=False)
        self.fusion = ConvNormAct(2 * dim, dim, 1, act_layer=act_layer) if fuse else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: NCHW."""
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            y = checkpoint_seq(self.blocks, x)
        else:
            y = self.blocks(x)
        y = self.proj(self.norm(y))
        return self.fusion(torch.cat((x, y), dim=1)) if self.fusion is not None else y


class AFFNet(TimmBackboneMixin, nn.Module):
    """AFFNet classifier/backbone with timm's model API (NCHW in, features at strides 2..32)."""

    block_groups = coarse_block_groups = [(r"^stages\.(\d+)", None), (r"^final_conv", (99999,))]
    no_weight_decay_pattern = r"\.mixer\.b[12]$"  # the filter biases: 2-D, so timm's 1-D rule would decay them

    def __init__(self, widths=VARIANTS[""]["widths"], depths=(1, 3, 2, 4, 3), mv2_expand: float = 4,
                 ffn_ratio: float = 2.0, fuse: bool = True, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 act: str = "relu", norm: str = "layer_norm", num_freq_blocks: int = 8, lambd: float = 0.01,
                 filter_dtype: torch.dtype | None = None):
        super().__init__()
        if act not in ACT_LAYERS:
            raise ValueError(f"act={act!r} is not supported; accepted: {', '.join(ACT_LAYERS)}")
        if norm not in NORM_LAYERS:
            raise ValueError(f"norm={norm!r} is not supported; accepted: {', '.join(NORM_LAYERS)}")
        if len(widths) != 5 or len(depths) != 5:
            raise ValueError(f"widths and depths need 5 entries (2 MV2 + 3 AFF stages), got {widths}, {depths}")
        act_layer, norm_layer = ACT_LAYERS[act], NORM_LAYERS[norm]
        mixer_kwargs = dict(num_blocks=num_freq_blocks, lambd=lambd, act=act, filter_dtype=filter_dtype)
        self.num_classes, self.in_chans, self.drop_rate = num_classes, in_chans, drop_rate
        self.grad_checkpointing = False
        self.stem = Stem(in_chans, STEM_WIDTH, 3, stride=2, act_layer=act_layer)
        n_aff = sum(depths[NUM_MV2_STAGES:])
        dpr = [drop_path_rate * i / max(n_aff - 1, 1) for i in range(n_aff)]  # linear rule over AFF blocks
        stages, prev, reduction, self.feature_info = [], STEM_WIDTH, 2, []
        for i, (w, d) in enumerate(zip(widths, depths)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            if i < NUM_MV2_STAGES:
                stages.append(MV2Stage(prev, w, d, stride, mv2_expand, act_layer))
            else:
                stages.append(AFFStage(prev, w, d, mv2_expand, ffn_ratio, fuse, norm_layer, act_layer,
                                       dpr[:d], mixer_kwargs))
                dpr = dpr[d:]
            self.feature_info.append(dict(num_chs=w, reduction=reduction, module=f"stages.{i}"))
            prev = w
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = min(HEAD_EXPAND * prev, HEAD_MAX)
        self.final_conv = ConvNormAct(prev, self.num_features, 1, act_layer=act_layer)
        self.head_layer = ClassifierHead
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def _forward_final(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(x)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, reset_other: bool = False) -> None:
        """``reset_other`` also drops the 1x1 expansion conv before the head (as pruning needs)."""
        if reset_other:
            self.final_conv = nn.Identity()
        super().reset_classifier(num_classes, global_pool, reset_other)


# ---------------------------------------------------------------------------------------------
# Official (ml-cvnets) checkpoint layout -> ours.

_CONV = {"exp_1x1": "conv_pw", "conv_3x3": "conv_dw", "red_1x1": "conv_pwl"}


def _conv_norm(rest: str) -> str:
    """``block.conv.X`` / ``block.norm.X`` (ml-cvnets ConvLayer) -> ``conv.X`` / ``bn.X``."""
    return re.sub(r"^block\.(conv|norm)\.", lambda m: "conv." if m.group(1) == "conv" else "bn.", rest)


def _mv2(rest: str) -> str:
    """``block.<exp_1x1|conv_3x3|red_1x1>.block.<conv|norm>.X`` -> ``<conv_pw|conv_dw|conv_pwl>.<conv|bn>.X``."""
    m = re.match(r"^block\.(exp_1x1|conv_3x3|red_1x1)\.(.*)$", rest)
    if m is None:
        raise KeyError(rest)
    return f"{_CONV[m.group(1)]}.{_conv_norm(m.group(2))}"


def _official_key(key: str, depths: tuple[int, ...]) -> str:
    """Map one official key to ours; ``KeyError`` when the key is not part of an AFFNet."""
    if key.startswith("conv_1."):
        return "stem." + _conv_norm(key[len("conv_1."):])
    if key.startswith("conv_1x1_exp."):
        return "final_conv." + _conv_norm(key[len("conv_1x1_exp."):])
    if key.startswith("classifier.fc."):
        return "head.fc." + key[len("classifier.fc."):]
    m = re.match(r"^layer_(\d)\.(\d+)\.(.*)$", key)
    if m is None:
        raise KeyError(key)
    s, j, rest = int(m.group(1)) - 1, int(m.group(2)), m.group(3)
    if s < NUM_MV2_STAGES:
        return f"stages.{s}.blocks.{j}.{_mv2(rest)}"
    if j == 0:
        return f"stages.{s}.downsample.{_mv2(rest)}"
    if rest.startswith(("conv_proj.", "fusion.")):
        name, tail = rest.split(".", 1)
        return f"stages.{s}.{'proj' if name == 'conv_proj' else 'fusion'}.{_conv_norm(tail)}"
    g = re.match(r"^global_rep\.(\d+)\.(.*)$", rest)
    if g is None:
        raise KeyError(key)
    b, tail = int(g.group(1)), g.group(2)
    if b == depths[s]:
        return f"stages.{s}.norm.{tail}"
    if tail.startswith("filter."):
        return f"stages.{s}.blocks.{b}.mixer.{tail[len('filter.'):]}"
    if tail.startswith("mlp."):
        return f"stages.{s}.blocks.{b}.mlp.{_mv2(tail[len('mlp.'):])}"
    return f"stages.{s}.blocks.{b}.{tail}"  # norm1 / norm2


def convert_official(state_dict: dict[str, torch.Tensor], depths: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Rename an official AFFNet state dict to our layout (``depths`` tells the final norm apart)."""
    out = {}
    for k, v in state_dict.items():
        try:
            out[_official_key(k, depths)] = v
        except KeyError:
            raise ValueError(f"checkpoint key {k!r} is not part of the official AFFNet layout") from None
    return out


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: AFFNet) -> dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: our layout passes through, the official one is converted.

    Accepts ml-cvnets' training checkpoints too (weights under ``model_state_dict``, DDP prefixes).
    """
    state_dict = unwrap_state_dict(state_dict)
    if "stem.conv.weight" in state_dict:
        return state_dict
    depths = tuple(len(s.blocks) for s in model.stages)
    return convert_official(state_dict, depths)


# ---------------------------------------------------------------------------------------------
# Registration.


def _cfg(**kwargs) -> dict:
    return dict(num_classes=1000, input_size=(3, 256, 256), pool_size=(8, 8), crop_pct=0.888,
                interpolation="bilinear", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                first_conv="stem.conv", classifier="head.fc", license="mit",
                paper_ids="arXiv:2307.14008", **kwargs)


default_cfgs = generate_default_cfgs({f"{name}.in1k": _cfg(origin_url=url) for name, url in OFFICIAL_URLS.items()})


def _require_local_file(variant: str, pretrained: bool, kwargs: dict) -> None:
    """The official weights have no direct URL: ``pretrained=True`` needs a local file."""
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and not overlay.get("file"):
        raise ValueError(
            f"{variant}: pretrained=True needs a local checkpoint; the official AFFNet weights are in a "
            f"OneDrive folder ({OFFICIAL_URLS[variant]}, from github.com/microsoft/TokenMixers, "
            f"'Adaptive Frequency Filters'). Download the .pt file and pass it with "
            f"timm.create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file='/path/to/file.pt'))")


def _create(variant: str, pretrained: bool = False, **kwargs) -> AFFNet:
    _require_local_file(variant, pretrained, kwargs)
    return build(AFFNet, variant, pretrained, num_stages=len(kwargs["widths"]),
                 pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


register_family(__name__, VARIANTS, _create)
