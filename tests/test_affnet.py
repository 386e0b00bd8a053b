"""AFFNet: fused filter kernel vs reference, AFF mixer, network (sizes, params/FLOPs, official checkpoints)."""
from collections import OrderedDict

import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import metazoo  # noqa: F401  (registers the models)
from metazoo.backbones._affnet_convert import convert_file
from metazoo.backbones.affnet import AFFNet, convert_official
from metazoo.kernels import use_backend
from metazoo.kernels.aff_filter import aff_filter, aff_filter_ref
from metazoo.mixers.aff import AFFMixer, fft_flop_mapping

PAPER = {"mz_affnet_et": (1.4e6, 0.4e9), "mz_affnet_t": (2.6e6, 0.8e9), "mz_affnet": (5.5e6, 1.5e9)}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _params(nb, bs, scale=0.3):
    shapes = [(2, nb, bs, bs), (2, nb, bs), (2, nb, bs, bs), (2, nb, bs)]
    return [(scale * torch.randn(s)).requires_grad_() for s in shapes]


def _run(x, ws, g, fn=aff_filter, **kw):
    y = fn(x, *ws, 0.01, **kw)
    return (y, *torch.autograd.grad(y, [x, *ws], g))


# --- kernel ---------------------------------------------------------------------------------

@pytest.mark.parametrize("B,nb,bs,H,W,act", [
    (2, 3, 13, 5, 7, "relu"),   # odd H, W; group width 13 (padded to 16)
    (1, 2, 40, 3, 4, "relu"),   # group width 40 (padded to 64), even W
    (3, 4, 6, 6, 9, "silu"),
])
def test_filter_kernel_matches_reference_fp32(B, nb, bs, H, W, act):
    x = torch.randn(B, nb * bs, H, W // 2 + 1, 2, requires_grad=True)
    ws = _params(nb, bs)
    g = torch.randn_like(x)
    got = _run(x, ws, g, act=act, backend="triton")
    ref = _run(x, ws, g, fn=aff_filter_ref, act=act)
    for name, a, b in zip(("y", "dx", "dw1", "db1", "dw2", "db2"), got, ref):
        assert torch.isfinite(a).all()
        assert rel(a, b) < 1e-5, name


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_filter_kernel_bf16_within_bf16_rounding(x_dtype):
    """bf16 operands (fp32 accumulation): error vs the fp32 reference stays at the bf16-reference level."""
    B, nb, bs, H, W = 2, 2, 13, 5, 7
    x32 = torch.randn(B, nb * bs, H, W // 2 + 1, 2)
    x = x32.to(x_dtype).requires_grad_()
    xr = x.detach().float().requires_grad_()
    ws = _params(nb, bs)
    g = torch.randn_like(x32)
    got = _run(x, ws, g.to(x_dtype), compute_dtype=torch.bfloat16, backend="triton")
    ref32 = _run(xr, ws, g, backend="torch")
    ref16 = _run(xr, ws, g, compute_dtype=torch.bfloat16, backend="torch")
    assert got[0].dtype == x_dtype
    for name, a, b, c in zip(("y", "dx", "dw1", "db1", "dw2", "db2"), got, ref32, ref16):
        bf16_level = rel(c, b)
        assert bf16_level > 0  # the bf16 path really rounds
        assert rel(a, b) < 2 * bf16_level + 1e-3, name


def test_filter_rejects_bad_arguments():
    x = torch.randn(1, 16, 4, 3, 2)
    ws = [p.detach() for p in _params(2, 8)]
    with pytest.raises(ValueError, match="channels"):
        aff_filter(torch.randn(1, 12, 4, 3, 2), *ws)
    with pytest.raises(ValueError, match="interleaved"):
        aff_filter(torch.randn(1, 16, 4, 3), *ws)
    with pytest.raises(ValueError, match="act"):
        aff_filter(x, *ws, act="gelu")
    with pytest.raises(ValueError, match="lambd"):
        aff_filter(x, *ws, lambd=-1.0)
    with pytest.raises(ValueError, match="b2"):
        aff_filter(x, ws[0], ws[1], ws[2], ws[1][:, :1])
    with pytest.raises(ValueError, match="num_blocks"):
        AFFMixer(30, num_blocks=8)


# --- mixer ----------------------------------------------------------------------------------

def test_mixer_kernel_path_matches_reference_and_official_math():
    m = AFFMixer(24, num_blocks=8, init_scale=0.3)
    x = torch.randn(2, 24, 7, 9, requires_grad=True)
    with use_backend("triton"):
        y = m(x)
    gy = torch.randn_like(y)
    gk = torch.autograd.grad(y, [x, *m.parameters()], gy)
    with use_backend("torch"):
        yr = m(x)
    gr = torch.autograd.grad(yr, [x, *m.parameters()], gy)
    assert rel(y, yr) < 1e-5
    assert all(rel(a, b) < 1e-5 for a, b in zip(gk, gr))
    # the official formulation, written out with complex tensors
    f = torch.fft.rfft2(x.detach(), norm="ortho")
    xb = f.reshape(2, 8, 3, 7, 5)
    w1 = torch.complex(m.w1[0], m.w1[1]).detach()
    w2 = torch.complex(m.w2[0], m.w2[1]).detach()
    h = torch.einsum("bkihw,kio->bkohw", xb, w1) + torch.complex(m.b1[0], m.b1[1]).detach()[..., None, None]
    h = torch.complex(h.real.relu(), h.imag.relu())
    o = torch.einsum("bkihw,kio->bkohw", h, w2) + torch.complex(m.b2[0], m.b2[1]).detach()[..., None, None]
    o = torch.complex(nn.functional.softshrink(o.real, 0.01), nn.functional.softshrink(o.imag, 0.01))
    official = torch.fft.irfft2(o.reshape(2, 24, 7, 5) * f, s=(7, 9), norm="ortho") + x.detach()
    assert rel(y.detach(), official) < 1e-5


def test_mixer_under_bf16_autocast_runs_fft_in_fp32():
    m = AFFMixer(16, num_blocks=2, init_scale=0.3)
    x = torch.randn(1, 16, 5, 6)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16), use_backend("triton"):
        y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert rel(y, ref) < 2e-2


# --- network --------------------------------------------------------------------------------

def _tiny(**kw):
    return AFFNet(widths=(8, 16, 16, 24, 32), depths=(1, 1, 1, 2, 1), mv2_expand=2, num_classes=10, **kw)


def test_model_kernel_and_reference_paths_agree():
    model = _tiny()
    for mod in model.modules():
        if isinstance(mod, AFFMixer):
            for p in mod.parameters():
                nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 3, 67, 45)
    out = {}
    for be in ("triton", "torch"):
        with use_backend(be):
            y = model(x)
        grads = torch.autograd.grad(y.square().sum(), list(model.parameters()))
        out[be] = (y, grads)
    assert rel(out["triton"][0], out["torch"][0]) < 1e-4
    ga, gb = out["triton"][1], out["torch"][1]
    assert rel(torch.cat([g.flatten() for g in ga]), torch.cat([g.flatten() for g in gb])) < 1e-4
    # per tensor, with a floor for the biases right before a norm (true gradient ~0, only noise)
    floor = 1e-4 * max(g.norm() for g in gb)
    assert all((a - b).norm() <= 1e-3 * b.norm() + floor for a, b in zip(ga, gb))


@pytest.mark.parametrize("name", list(PAPER))
def test_params_and_flops_match_paper(name):
    """Paper FLOPs are multiply-accumulates (ml-cvnets' profiler); FlopCounterMode counts 2 per MAC.

    The FFTs are counted as 2.5 N log2 N per real 2-D transform, the fused filter by its formula.
    The paper prints one decimal, so a MAC count within 3% or inside that rounding passes.
    """
    with torch.device("meta"):
        model = timm.create_model(name)
        x = torch.randn(1, 3, 256, 256)
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False, custom_mapping=fft_flop_mapping()) as fc, torch.no_grad():
        model(x)
    macs = fc.get_total_flops() / 2
    p_paper, f_paper = PAPER[name]
    assert abs(params / p_paper - 1) < 0.03, params
    assert abs(macs / f_paper - 1) < 0.03 or round(macs / 1e9, 1) == f_paper / 1e9, macs
    counted = {str(k) for k in fc.get_flop_counts()["Global"]}
    assert {"aten._fft_r2c", "aten._fft_c2r"} <= counted


@pytest.mark.parametrize("size", [(224, 224), (256, 256), (97, 131)])
def test_runs_at_sizes_and_features(size):
    model = timm.create_model("mz_affnet_et", num_classes=7).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        y = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert y.shape == (1, 7) and torch.isfinite(y).all()
    assert [f.shape[1] for f in feats] == [32, 48, 64, 104, 144]
    for f, r in zip(feats, (2, 4, 8, 16, 32)):
        assert f.shape[-2:] == tuple(-(-s // r) for s in size)


def test_features_only_and_timm_api():
    fm = timm.create_model("mz_affnet_et", features_only=True, out_indices=(1, 2, 4))
    assert fm.feature_info.reduction() == [4, 8, 32]
    feats = fm(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(48, 16, 24), (64, 8, 12), (144, 2, 3)]
    with pytest.raises(ValueError, match="out_indices"):
        timm.create_model("mz_affnet_et", features_only=True, out_indices=(5,))
    m = timm.create_model("mz_affnet_et")
    assert m.forward_head(m.forward_features(torch.randn(1, 3, 64, 64)), pre_logits=True).shape == (1, 576)
    m.reset_classifier(5)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    assert all(n.endswith(("mixer.b1", "mixer.b2")) for n in m.no_weight_decay())
    assert len(m.no_weight_decay()) == 2 * 9
    m.set_grad_checkpointing(True)
    m(torch.randn(2, 3, 64, 64)).sum().backward()
    with pytest.raises(ValueError, match="smaller than the total stride"):
        m(torch.randn(1, 3, 16, 64))


# --- official checkpoints ---------------------------------------------------------------------

class _Wrap(nn.Module):
    """An ml-cvnets module whose layers live under ``.block``."""

    def __init__(self, block):
        super().__init__()
        self.block = block


def _conv_layer(cin, cout, k=1, groups=1, act=True):
    layers = OrderedDict(conv=nn.Conv2d(cin, cout, k, groups=groups, bias=False), norm=nn.BatchNorm2d(cout))
    if act:
        layers["act"] = nn.ReLU()
    return _Wrap(nn.Sequential(layers))


def _inverted_residual(cin, cout, expand):
    mid = int(round(cin * expand))
    mid = max(8, (mid + 4) // 8 * 8)
    return _Wrap(nn.Sequential(OrderedDict(exp_1x1=_conv_layer(cin, mid), conv_3x3=_conv_layer(mid, mid, 3, mid),
                                           red_1x1=_conv_layer(mid, cout, act=False))))


class _Filter(nn.Module):
    def __init__(self, dim):
        super().__init__()
        bs = dim // 8
        self.w1 = nn.Parameter(torch.randn(2, 8, bs, bs))
        self.b1 = nn.Parameter(torch.randn(2, 8, bs))
        self.w2 = nn.Parameter(torch.randn(2, 8, bs, bs))
        self.b2 = nn.Parameter(torch.randn(2, 8, bs))


class _OfficialBlock(nn.Module):
    def __init__(self, dim, ffn):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.filter = _Filter(dim)
        self.mlp = _inverted_residual(dim, dim, ffn / dim)


class _OfficialAFFBlock(nn.Module):
    def __init__(self, dim, ffn, n):
        super().__init__()
        self.global_rep = nn.Sequential(*[_OfficialBlock(dim, ffn) for _ in range(n)], nn.LayerNorm(dim))
        self.conv_proj = _conv_layer(dim, dim, act=False)
        self.fusion = _conv_layer(2 * dim, dim)


def _official_et():
    """The official ``xx_small`` (AFFNet-ET) module tree, with the official attribute names."""
    m = nn.Module()
    m.conv_1 = _conv_layer(3, 16, 3)
    m.layer_1 = nn.Sequential(_inverted_residual(16, 32, 2))
    m.layer_2 = nn.Sequential(*[_inverted_residual(32 if i == 0 else 48, 48, 2) for i in range(3)])
    prev = 48
    for i, (dim, ffn, n) in enumerate([(64, 128, 2), (104, 208, 4), (144, 288, 3)]):
        setattr(m, f"layer_{i + 3}", nn.Sequential(_inverted_residual(prev, dim, 2), _OfficialAFFBlock(dim, ffn, n)))
        prev = dim
    m.conv_1x1_exp = _conv_layer(144, 576)
    m.classifier = nn.Sequential(OrderedDict(fc=nn.Linear(576, 1000)))
    return m


def test_official_checkpoint_loads_strictly(tmp_path):
    official = _official_et().state_dict()
    official = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in official.items()}
    path = tmp_path / "affnet_et_best.pt"
    torch.save({f"module.{k}": v for k, v in official.items()}, path)
    model = timm.create_model("mz_affnet_et", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    sd = model.state_dict()
    assert len(sd) == len(official)
    pairs = [("layer_3.1.global_rep.1.filter.w2", "stages.2.blocks.1.mixer.w2"),
             ("layer_4.1.global_rep.4.weight", "stages.3.norm.weight"),
             ("layer_5.0.block.conv_3x3.block.norm.running_var", "stages.4.downsample.conv_dw.bn.running_var"),
             ("layer_5.1.fusion.block.conv.weight", "stages.4.fusion.conv.weight"),
             ("conv_1x1_exp.block.norm.bias", "final_conv.bn.bias"),
             ("classifier.fc.weight", "head.fc.weight")]
    for ko, kn in pairs:
        assert torch.equal(official[ko], sd[kn]), kn
    depths = tuple(len(s.blocks) for s in model.stages)
    assert sorted(convert_official(official, depths)) == sorted(sd)
    # the publishing script: official file -> safetensors in our layout, which loads as-is
    out = tmp_path / "mz_affnet_et.safetensors"
    assert convert_file(str(path), str(out)) == "mz_affnet_et"
    again = timm.create_model("mz_affnet_et", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in sd.items())


def test_pretrained_without_file_explains_where_weights_are():
    with pytest.raises(ValueError, match=r"1drv\.ms.*pretrained_cfg_overlay"):
        timm.create_model("mz_affnet_t", pretrained=True)
    with pytest.raises(ValueError, match="not part of the official AFFNet layout"):
        convert_official({"layer_9.0.x": torch.zeros(1)}, (1, 3, 2, 4, 3))


def test_model_compiles_to_one_graph():
    """No graph breaks under torch.compile (the dispatcher is resolved as a trace-time constant)."""
    import torch._dynamo
    model = _tiny()
    torch._dynamo.reset()
    with use_backend("torch"):
        ex = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert ex.graph_count == 1 and ex.graph_break_count == 0, ex.break_reasons
