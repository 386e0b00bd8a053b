"""IdentityFormer, RandFormer, RIFormer: equality with independent references of the official
forwards (sail-sg ``metaformer_baselines.py``, mmpretrain ``riformer.py``) under official-layout
checkpoints written here, RIFormer's deploy form, RandFormer at other sizes, params/GMACs vs the papers."""
import re

import pytest
import timm
import torch
import torch.nn.functional as F

import metazoo  # noqa: F401  (registers mz_* models)
from metazoo.zoo import count
from test_backbones import _official_layout

FAMILIES = ("identityformer", "randformer", "riformer")
SIZES = ("s12", "s24", "s36", "m36", "m48")


S12_CHANNEL_BLOCKS = 64 * 2 + 128 * 2 + 320 * 6 + 512 * 2  # sum of dim x depth: one affine (a, c) per channel


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def _perturb(model):
    """Non-trivial norms, scales and activations so every parameter shows in the output."""
    for n, p in model.named_parameters():
        if p.ndim <= 1 or "affine" in n:
            p.copy_(p + 0.3 * torch.randn_like(p))
    return model.eval()


# ---- independent references of the official forwards, reading official-layout state dicts ----
def _sail_forward(sd, x, random_mixing):
    """sail-sg MetaFormer baselines (IdentityFormer / RandFormer) on NHWC: post-normed stem,
    pre-normed downsampling, blocks with GroupNorm(1)-like norms without bias, StarReLU Linear MLPs,
    mean pool, LayerNorm, Linear head."""
    def ln_c(t, w, b=None):  # normalise the last (channel) dim
        return F.layer_norm(t, t.shape[-1:], w, b, 1e-6)

    def ln_all(t, w):  # normalise (H, W, C) of each sample
        c = t - t.mean((1, 2, 3), keepdim=True)
        return c / torch.sqrt(c.pow(2).mean((1, 2, 3), keepdim=True) + 1e-6) * w

    x = F.conv2d(x, sd["downsample_layers.0.conv.weight"], sd["downsample_layers.0.conv.bias"], stride=4, padding=2)
    x = ln_c(x.permute(0, 2, 3, 1), sd["downsample_layers.0.post_norm.weight"])
    for i in range(4):
        if i:
            t = ln_c(x, sd[f"downsample_layers.{i}.pre_norm.weight"]).permute(0, 3, 1, 2)
            t = F.conv2d(t, sd[f"downsample_layers.{i}.conv.weight"], sd[f"downsample_layers.{i}.conv.bias"], 2, 1)
            x = t.permute(0, 2, 3, 1)
        j = 0
        while f"stages.{i}.{j}.norm1.weight" in sd:
            p = f"stages.{i}.{j}."
            n = ln_all(x, sd[p + "norm1.weight"])
            if random_mixing and i >= 2:
                B, H, W, C = n.shape
                n = torch.einsum("mn,bnc->bmc", sd[p + "token_mixer.random_matrix"], n.reshape(B, H * W, C))
                n = n.reshape(B, H, W, C)
            rs1, rs2 = sd.get(p + "res_scale1.scale", 1.0), sd.get(p + "res_scale2.scale", 1.0)
            x = x * rs1 + n
            h = F.linear(ln_all(x, sd[p + "norm2.weight"]), sd[p + "mlp.fc1.weight"])
            h = sd[p + "mlp.act.scale"] * F.relu(h) ** 2 + sd[p + "mlp.act.bias"]
            x = x * rs2 + F.linear(h, sd[p + "mlp.fc2.weight"])
            j += 1
    x = F.layer_norm(x.mean((1, 2)), x.shape[-1:], sd["norm.weight"], sd["norm.bias"], 1e-6)
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def _mmpretrain_forward(sd, x):
    """mmpretrain RIFormer (training form: ``affine(GN(x)) - GN(x)``; deploy form: ``norm_reparam``) on
    NCHW with ``backbone.``/``head.`` keys: GroupNorm(1) with bias, GELU conv MLP, layer scales,
    ``norm6`` GroupNorm on the last map, global average pool, linear head."""
    b = "backbone."

    def gn(t, key):
        return F.group_norm(t, 1, sd[key + ".weight"], sd[key + ".bias"], 1e-5)

    x = F.conv2d(x, sd[b + "patch_embed.proj.weight"], sd[b + "patch_embed.proj.bias"], stride=4, padding=2)
    for k in range(7):
        p = f"{b}network.{k}."
        if k % 2:
            x = F.conv2d(x, sd[p + "proj.weight"], sd[p + "proj.bias"], stride=2, padding=1)
            continue
        j = 0
        while f"{p}{j}.norm2.weight" in sd:
            q = f"{p}{j}."
            if q + "norm_reparam.weight" in sd:
                mix = gn(x, q + "norm_reparam")
            else:
                n = gn(x, q + "norm1")
                mix = F.conv2d(n, sd[q + "token_mixer.affine.weight"], sd[q + "token_mixer.affine.bias"],
                               groups=n.shape[1]) - n
            x = x + sd[q + "layer_scale_1"].view(-1, 1, 1) * mix
            h = F.gelu(F.conv2d(gn(x, q + "norm2"), sd[q + "mlp.fc1.weight"], sd[q + "mlp.fc1.bias"]))
            x = x + sd[q + "layer_scale_2"].view(-1, 1, 1) * F.conv2d(h, sd[q + "mlp.fc2.weight"], sd[q + "mlp.fc2.bias"])
            j += 1
    x = gn(x, b + "norm6").mean((2, 3))
    return F.linear(x, sd["head.fc.weight"], sd["head.fc.bias"])


def _mmpretrain_layout(sd):
    """Our RIFormer state dict in mmpretrain's layout (the inverse of the conversion on load)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("stem.conv.", "backbone.patch_embed.proj.")
        k = re.sub(r"^stages\.(\d)\.downsample\.conv\.", lambda m: f"backbone.network.{2 * int(m[1]) - 1}.proj.", k)
        k = re.sub(r"^stages\.(\d)\.blocks\.(\d+)\.", lambda m: f"backbone.network.{2 * int(m[1])}.{m[2]}.", k)
        k = re.sub(r"\.layer_scale([12])\.scale$", r".layer_scale_\1", k)
        k = k.replace("head.norm.", "backbone.norm6.")
        out[k] = v.clone()
    return out


def _mmpretrain_deploy(sd):
    """mmpretrain's ``switch_to_deploy`` on a state dict: ``norm_reparam = (w (a-1), b (a-1) + c)``."""
    out = dict(sd)
    for k in [k for k in sd if k.endswith(".token_mixer.affine.weight")]:
        p = k[:-len("token_mixer.affine.weight")]
        g = out.pop(k).reshape(-1) - 1
        c = out.pop(p + "token_mixer.affine.bias")
        out[p + "norm_reparam.weight"] = out.pop(p + "norm1.weight") * g
        out[p + "norm_reparam.bias"] = out.pop(p + "norm1.bias") * g + c
    return out


def _load(name, path, **kw):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw).eval()


# ---- tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["identityformer", "randformer"])
@torch.no_grad()
def test_sail_official_layout_equals_official_forward(family, tmp_path):
    """An official-layout file (Linear MLP weights, ``stages.i.j``, ``random_matrix`` buffers) loads
    with conversion and the model equals the official forward at the 224 px training size."""
    name = f"mz_{family}_s12"
    src = _perturb(timm.create_model(name))
    official = _official_layout(name, src.state_dict())
    assert ("stages.2.0.token_mixer.random_matrix" in official) == (family == "randformer")
    path = tmp_path / "official.pth"
    torch.save(official, path)
    model = _load(name, path)
    x = torch.randn(1, 3, 224, 224)
    assert _rel(model(x), _sail_forward(official, x, family == "randformer")) <= 1e-5


@torch.no_grad()
def test_riformer_mmpretrain_layout_and_deploy_form(tmp_path):
    """mmpretrain training-form and deploy-form files load into both of our forms; every combination
    equals mmpretrain's forward; ``reparameterize`` leaves no token-mixer parameters."""
    src = _perturb(timm.create_model("mz_riformer_s12"))
    train_sd = _mmpretrain_layout(src.state_dict())
    deploy_sd = _mmpretrain_deploy(train_sd)
    x = torch.randn(2, 3, 64, 96)
    want = _mmpretrain_forward(train_sd, x)
    assert _rel(_mmpretrain_forward(deploy_sd, x), want) <= 1e-5  # the reference's own two forms agree
    for tag, sd in (("train", train_sd), ("deploy", deploy_sd)):
        path = tmp_path / f"{tag}.pth"
        torch.save({"meta": {"mmpretrain_version": "1.0.0rc7"}, "state_dict": sd}, path)
        for deploy in (False, True):
            model = _load("mz_riformer_s12", path, deploy=deploy)
            assert _rel(model(x), want) <= 1e-5, (tag, deploy)
            if not deploy:
                n_mixer = sum(p.numel() for n, p in model.named_parameters() if "token_mixer" in n)
                assert n_mixer == 2 * S12_CHANNEL_BLOCKS
                timm.utils.reparameterize_model(model, inplace=True)  # timm's hook calls our reparameterize()
                assert _rel(model(x), want) <= 1e-5, (tag, "reparameterized")
            assert not [n for n, _ in model.named_parameters() if "token_mixer" in n]


def test_riformer_deploy_form_trains_and_matches_training_form():
    """Training-form and deploy-form outputs and input gradients agree (fp32, 1e-5 relative), with the
    block's fused path and the plain path (``unfuse()``; a model built with drop path, evaluated)."""
    train = _perturb(timm.create_model("mz_riformer_s12", num_classes=10))
    deploy = _perturb(timm.create_model("mz_riformer_s12", num_classes=10))
    deploy.load_state_dict(train.state_dict())
    deploy.switch_to_deploy()
    assert sum(p.numel() for p in train.parameters()) - sum(p.numel() for p in deploy.parameters()) == 2 * S12_CHANNEL_BLOCKS
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    y_t = train(x)
    g_t, = torch.autograd.grad(y_t.square().sum(), x)
    y_d = deploy(x)
    g_d, = torch.autograd.grad(y_d.square().sum(), x)
    assert _rel(y_d, y_t) <= 1e-5 and _rel(g_d, g_t) <= 1e-5
    plain = timm.create_model("mz_riformer_s12", num_classes=10, drop_path_rate=0.1)
    plain.load_state_dict(train.state_dict())
    for block in plain.modules():
        if hasattr(block, "unfuse"):
            block.unfuse()  # the plain mixer(norm1(x)) branch
    assert _rel(plain.eval()(x), y_t) <= 1e-5


@torch.no_grad()
def test_randformer_other_sizes_and_features_only():
    """Native grid: the stored matrix as is. Other grids: a resized row-stochastic matrix that is the
    identity-preserving convex mix (constant maps stay constant); features_only works at any size."""
    from metazoo.mixers.random_mixing import RandomMixing
    mix = RandomMixing(num_tokens=49)
    assert mix.matrix(7, 7) is mix.random_matrix
    m = mix.matrix(5, 9)
    assert m.shape == (45, 45) and (m >= 0).all() and torch.allclose(m.sum(-1), torch.ones(45))
    const = torch.full((1, 3, 5, 9), 2.5)
    assert torch.allclose(mix(const), const)
    with pytest.raises(ValueError, match="num_tokens"):
        RandomMixing(num_tokens=50)
    for family in ("identityformer", "randformer", "riformer"):
        fm = timm.create_model(f"mz_{family}_s12", features_only=True).eval()
        for size in ((224, 224), (96, 160)):
            feats = fm(torch.randn(1, 3, *size))
            assert [f.shape[1] for f in feats] == [64, 128, 320, 512]
            assert [f.shape[-1] for f in feats] == [size[1] // s for s in (4, 8, 16, 32)]


# Params (M) and GMACs at 224 px from the papers: MetaFormer Baselines (arXiv 2210.13452) Table for
# IdentityFormer/RandFormer (RandFormer adds frozen random-matrix parameters, 0.2-0.9 M, not
# counted here: buffers), RIFormer (arXiv 2304.05659; mmpretrain metafile for 3-digit figures).
PAPER = {
    "identityformer": {"s12": (11.9, 1.8), "s24": (21.3, 3.4), "s36": (30.8, 5.0), "m36": (56.1, 8.8),
                       "m48": (73.3, 11.5)},
    "randformer": {"s12": (11.9, 1.9), "s24": (21.3, 3.5), "s36": (30.8, 5.2), "m36": (56.1, 9.0),
                   "m48": (73.3, 11.9)},
    "riformer": {"s12": (11.915, 1.822), "s24": (21.389, 3.412), "s36": (30.863, 5.003), "m36": (56.173, 8.801),
                 "m48": (73.473, 11.59)},
}
FROZEN_M = {"s12": 0.2, "s24": 0.5, "s36": 0.7, "m36": 0.7, "m48": 0.9}  # RandFormer's frozen parameters


def _within(ours, paper, decimals):
    """1% of the paper's figure, or the figure's own rounding (half a unit of its last digit)."""
    return abs(ours - paper) <= max(0.01 * paper, 0.5 * 10 ** -decimals + 1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_params_and_gmacs_match_the_papers(family):
    for size in SIZES:
        name = f"mz_{family}_{size}"
        row = count(name)
        params, gmacs = row["params_m"], row["gmacs"]
        if family == "riformer":  # the published figures are the deploy form's (= PoolFormer's)
            with torch.device("meta"):
                params = sum(p.numel() for p in timm.create_model(name).reparameterize().parameters()) / 1e6
        want_p, want_g = PAPER[family][size]
        assert abs(params - want_p) <= 0.01 * want_p, (name, params, want_p)
        assert _within(gmacs, want_g, 2 if family == "riformer" else 1), (name, gmacs, want_g)
        if family == "randformer":
            with torch.device("meta"):
                frozen = sum(b.numel() for b in timm.create_model(name).buffers()) / 1e6
            assert _within(frozen, FROZEN_M[size], 1), (name, frozen)
