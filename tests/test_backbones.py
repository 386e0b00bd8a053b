"""The five timm-referenced families: output equality with timm, checkpoint loading, bad input."""
import pickle

import pytest
import timm
import torch

import metazoo  # noqa: F401  (registers mz_* models)
from metazoo.backbones._common import save_state_dict

TIMM_FAMILIES = ("poolformer", "poolformerv2", "convformer", "caformer", "mambaout")
OURS = [n for n in timm.list_models("mz_*") if n[3:].split("_")[0] in TIMM_FAMILIES]
SMALL = ["mz_poolformer_s12", "mz_poolformerv2_s12", "mz_convformer_s18", "mz_caformer_s18", "mz_mambaout_femto"]


def _pair(name, **kw):
    ref = timm.create_model(name[3:], **kw).eval()
    ours = timm.create_model(name, **kw).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def test_every_variant_registered():
    assert len(OURS) == 28
    timm_tags = {n for a in TIMM_FAMILIES for n in timm.list_pretrained(f"{a}_*")}
    ours_tags = {n[3:] for n in timm.list_pretrained("mz_*") if n[3:].split("_")[0] in TIMM_FAMILIES}
    assert ours_tags == timm_tags and len(ours_tags) >= 60


@pytest.mark.parametrize("name", OURS)
@torch.no_grad()
def test_equal_to_timm(name):
    ours, ref = _pair(name)
    x = torch.randn(2, 3, 32, 48)
    assert (ours(x) - ref(x)).abs().max() <= 1e-5
    assert (ours.forward_features(x) - ref.forward_features(x)).abs().max() <= 1e-5
    assert (ours.forward_head(ours.forward_features(x), pre_logits=True)
            - ref.forward_head(ref.forward_features(x), pre_logits=True)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", SMALL)
def test_training_with_drop_path_equal_to_timm(name):
    """Train mode at drop path 0.5 (the fused residual path, masks drawn as timm's DropPath draws them):
    with the same seed, logits and input gradient equal timm's."""
    ours, ref = _pair(name, drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 48)
    outs = []
    for model in (ours.train(), ref.train()):
        xi = x.clone().requires_grad_()
        torch.manual_seed(3)
        y = model(xi)
        y.square().sum().backward()
        outs.append((y, xi.grad))
    (y_ours, g_ours), (y_ref, g_ref) = outs
    assert (y_ours - y_ref).abs().max() <= 1e-5 * y_ref.abs().max()
    assert (g_ours - g_ref).abs().max() <= 1e-5 * g_ref.abs().max()
    torch.manual_seed(3)
    assert not torch.allclose(ref.eval()(x), y_ref), "no branch was dropped"


@pytest.mark.parametrize("name", SMALL)
@torch.no_grad()
def test_features_only_equal_to_timm(name):
    ref = timm.create_model(name[3:], features_only=True, out_indices=(0, 1, 2, 3)).eval()
    ours = timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 96, 64)
    fo, fr = ours(x), ref(x)
    assert [f.shape for f in fo] == [f.shape for f in fr]
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(fo, fr))
    assert ours.feature_info.reduction() == [4, 8, 16, 32]
    assert ours.feature_info.channels() == ref.feature_info.channels()


@pytest.mark.parametrize("name", SMALL)
@torch.no_grad()
def test_kwargs_override_the_variant(name):
    """create_model kwargs replace a variant's depths/dims (timm's MambaOut allows it; we do it for all)."""
    kw = dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64), num_classes=3)
    ours = timm.create_model(name, **kw).eval()
    assert [len(s.blocks) for s in ours.stages] == [1, 1, 2, 1]
    assert ours.feature_info[-1]["num_chs"] == 64
    x = torch.randn(1, 3, 64, 64)
    assert ours(x).shape == (1, 3)
    if "mambaout" in name:
        ref = timm.create_model(name[3:], **kw).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
        assert (ours(x) - ref(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", SMALL)
def test_timm_api(name):
    ours, ref = _pair(name)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = ours.forward_intermediates(x)
        final_r, inter_r = ref.forward_intermediates(x)
        assert (final - final_r).abs().max() <= 1e-5
        assert all((a - b).abs().max() <= 1e-5 for a, b in zip(inter, inter_r))
        assert [t.shape[1] for t in inter] == [f["num_chs"] for f in ours.feature_info]
        ours.reset_classifier(7)
        assert ours(x).shape == (1, 7)
        ours.reset_classifier(0)
        assert ours(x).shape == (1, ours.head_hidden_size)
    ours.set_grad_checkpointing(True)
    ours.reset_classifier(5)
    ours.train()
    ours(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)
    assert ours.group_matcher()["stem"] == r"^stem"
    assert {"stem.conv.bias", "stem.conv1.bias"} & ours.no_weight_decay()


def _official_layout(name, sd):
    """Write a state dict in the official release's key layout (the inverse of our conversion)."""
    import re
    out = {}
    for k, v in sd.items():
        if name.startswith("mz_poolformer_"):
            k = k.replace("stem.conv.", "patch_embed.proj.")
            k = re.sub(r"^stages\.(\d)\.downsample\.conv\.", lambda m: f"network.{2 * int(m[1]) - 1}.proj.", k)
            k = re.sub(r"^stages\.(\d)\.blocks\.(\d+)\.", lambda m: f"network.{2 * int(m[1])}.{m[2]}.", k)
            k = re.sub(r"\.layer_scale([12])\.scale$", r".layer_scale_\1", k)
            k = k.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        elif name.startswith("mz_mambaout"):
            k = k.replace("stem.", "downsample_layers.0.")
            k = re.sub(r"^stages\.(\d)\.downsample\.", r"downsample_layers.\1.", k)
            k = re.sub(r"^stages\.(\d)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
            k = k.replace("head.pre_logits.fc.", "head.fc1.").replace("head.pre_logits.norm.", "head.norm_h.")
            k = k.replace("head.fc.", "head.fc2.").replace("head.norm.", "norm.").replace("head.norm_h.", "head.norm.")
        else:
            k = k.replace("stem.conv.", "downsample_layers.0.conv.").replace("stem.norm.", "downsample_layers.0.post_norm.")
            k = re.sub(r"^stages\.(\d)\.downsample\.norm\.", r"downsample_layers.\1.pre_norm.", k)
            k = re.sub(r"^stages\.(\d)\.downsample\.conv\.", r"downsample_layers.\1.conv.", k)
            k = re.sub(r"^stages\.(\d)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
            k = k.replace("head.norm.", "norm.").replace("head.fc.", "head.")
            if v.ndim == 4 and v.shape[-2:] == (1, 1):
                v = v.flatten(1)  # the official release stores 1x1 convs as Linear
        out[k] = v.clone()
    return out


@pytest.mark.parametrize("name", ["mz_poolformer_s12", "mz_convformer_s18", "mz_caformer_s18", "mz_mambaout_femto"])
@torch.no_grad()
def test_pretrained_file_timm_and_official_layouts(name, tmp_path):
    src = timm.create_model(name[3:]).eval()
    sd = src.state_dict()
    st = tmp_path / "timm.safetensors"
    save_state_dict(sd, st)
    off = tmp_path / "official.pth"
    official = _official_layout(name, sd)
    assert not set(official) & {k for k in sd if k.startswith("stages.0.blocks.")}  # really another layout
    torch.save({"model": official}, off)
    x = torch.randn(1, 3, 64, 64)
    want = src(x)
    for f in (st, off):
        m = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(f))).eval()
        assert (m(x) - want).abs().max() <= 1e-5, f


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path):
    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as fh:
        pickle.dump({"stem.conv.weight": _Evil()}, fh)
    with pytest.raises((pickle.UnpicklingError, RuntimeError), match="weights_only|Unsupported global"):
        timm.create_model("mz_poolformerv2_s12", pretrained=True, pretrained_cfg_overlay=dict(file=str(bad)))
    from metazoo.backbones._common import load_checkpoint
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(bad)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="tag"):
        timm.create_model("mz_caformer_s18.not_a_tag")
    with pytest.raises(ValueError, match="out_indices"):
        timm.create_model("mz_caformer_s18", features_only=True, out_indices=(1, 4))
    m = timm.create_model("mz_poolformerv2_s12")
    with pytest.raises(ValueError, match="input"):
        m(torch.randn(1, 3, 31, 64))
    with pytest.raises(ValueError, match="input"):
        timm.create_model("mz_mambaout_femto", features_only=True)(torch.randn(1, 3, 16, 16))
    sd = timm.create_model("poolformerv2_s12", in_chans=5).state_dict()
    f = tmp_path / "five.safetensors"
    save_state_dict(sd, f)
    with pytest.raises(ValueError, match="in_chans"):
        timm.create_model("mz_poolformerv2_s12", in_chans=4, pretrained=True, pretrained_cfg_overlay=dict(file=str(f)))


def test_tags_and_num_classes():
    m = timm.create_model("mz_caformer_s18.sail_in22k")
    assert m.num_classes == 21841 and m.pretrained_cfg["hf_hub_id"] == "timm/caformer_s18.sail_in22k"
    m = timm.create_model("mz_caformer_b36.sail_in22k_ft_in1k_384")
    assert m.pretrained_cfg["input_size"] == (3, 384, 384)


def test_family_registration_from_the_variant_table():
    """register_family: one entry function per VARIANTS row, attributed to the family module."""
    from metazoo.backbones import list_families, poolformer
    from timm.models import model_entrypoint
    fn = model_entrypoint("mz_poolformerv2_m36")
    assert fn is poolformer.mz_poolformerv2_m36
    assert (fn.__module__, fn.__name__, fn.__qualname__) == (poolformer.__name__, "mz_poolformerv2_m36", "mz_poolformerv2_m36")
    assert sorted(list_families()["poolformer"]) == sorted(
        [f"mz_poolformer_{s}" for s in poolformer.VARIANTS] + [f"mz_poolformerv2_{s}" for s in poolformer.VARIANTS_V2])
    assert timm.create_model("mz_poolformerv2_s12", depths=(1, 1, 1, 1)).feature_info[3]["num_chs"] == 512


def test_unwrap_state_dict():
    from metazoo.backbones._common import unwrap_state_dict
    w, e = torch.zeros(1), torch.ones(1)
    ckpt = {"epoch": 3, "state_dict_ema": {"x": e}, "model": {"module._orig_mod.x": w, "step": 1}}
    assert unwrap_state_dict(ckpt) == {"x": w}
    assert unwrap_state_dict(ckpt, use_ema=True) == {"x": e}
    with pytest.raises(ValueError, match="no tensors"):
        unwrap_state_dict({"epoch": 3})


@pytest.mark.parametrize("mid_norm", [True, False])
def test_conv_stem_recomputes_its_norm_and_act_in_backward(mid_norm):
    """MambaOut's stem keeps conv1's output for backward and not the mid norm's output (the largest map
    of the network), and computes the same values and gradients as the plain chain."""
    from metazoo.backbones._layers import ConvStem

    torch.manual_seed(0)
    stem = ConvStem(3, 32, mid_norm=mid_norm).train()
    x = torch.randn(2, 3, 32, 32)

    def plain(x):
        y = stem.conv2(stem._norm_act(stem.conv1(x)))
        return stem.norm2(y.permute(0, 2, 3, 1))

    def run(fn):
        stem.zero_grad()
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = fn(x)
        (y * torch.arange(y.shape[-1])).sum().backward()
        return y, [p.grad.clone() for p in stem.parameters()], sum(saved.values())

    y, grads, kept = run(stem)
    y_plain, grads_plain, kept_plain = run(plain)
    assert torch.equal(y, y_plain) and all(torch.equal(a, b) for a, b in zip(grads, grads_plain))
    conv1_out = 2 * 16 * 16 * 16 * 4  # fp32 bytes of conv1's output, as many as the norm's output
    if mid_norm:  # the norm's output and moments
        assert kept_plain - kept >= conv1_out, (kept_plain, kept)
    else:  # act alone keeps conv1's output either way: no recompute
        assert kept_plain == kept, (kept_plain, kept)
