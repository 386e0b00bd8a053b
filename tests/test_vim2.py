"""ViM2: registration and parameter counts, timm API, mixers, kernel vs reference paths, training."""
import pytest
import timm
import torch
import torch.nn.functional as F

import metazoo  # noqa: F401  (registers mz_* models)
from metazoo.backbones.vim2 import ViM2, WeightedAverageStack, mixer_order
from metazoo.kernels import use_backend
from metazoo.mixers.mambamixer import (SelectiveChannelMixer, SelectiveTokenMixer, cross_merge, cross_scan,
                                       grouped_conv1d)

# dims, token mixers, channel mixers, widths, state size: small enough for Triton's interpreter
TINY = dict(dims=(8, 8, 16, 16), token_mixers=(2, 1, 1, 1), channel_mixers=(1, 0, 0, 1), d_state=2)


def _tiny(**kw):
    return ViM2(**{**TINY, "num_classes": 3, **kw})


@pytest.mark.parametrize("name,target", [("mz_vim2_t", 20e6), ("mz_vim2_s", 43e6), ("mz_vim2_b", 74e6)])
def test_param_counts_match_paper(name, target):
    with torch.device("meta"):
        model = timm.create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / target - 1) < 0.05, f"{name}: {n / 1e6:.2f}M vs {target / 1e6:.0f}M"


def test_pretrained_raises():
    with pytest.raises(RuntimeError, match="no pretrained ViM2 weights"):
        timm.create_model("mz_vim2_t", pretrained=True)


def test_mixer_order_and_weight_count():
    assert mixer_order(2, 1) == ["t", "t", "c"]
    assert mixer_order(6, 3) == ["t", "t", "c"] * 3
    assert mixer_order(1, 1) == ["t", "c"]
    with pytest.raises(ValueError, match="token_mixers"):
        mixer_order(1, 2)
    stack = WeightedAverageStack(8, ["t", "c", "t", "c"], 2.0, [0.0] * 4, d_state=2)
    # one scalar per (mixer, earlier output) pair, the stage input counted once
    assert sum(w.numel() for w in stack.avg_weights) == 1 + 2 + 3 + 4


def test_weighted_average_starts_as_residual_stack():
    torch.manual_seed(0)
    stack = WeightedAverageStack(8, ["t", "t", "c"], 2.0, [0.0] * 3, d_state=2).eval()
    x = torch.randn(2, 5, 6, 8)
    want = x
    for m in stack.mixers:
        want = m(want)
    with use_backend("torch"):
        torch.testing.assert_close(stack(x), want)
        with torch.no_grad():
            stack.avg_weights[2].copy_(torch.tensor([0.5, 0.25, 0.25]))
        x2 = stack.mixers[0](x)
        x3 = stack.mixers[1](x2)
        torch.testing.assert_close(stack(x), stack.mixers[2](0.5 * x + 0.25 * x2 + 0.25 * x3))


def test_cross_scan_roundtrip():
    x = torch.randn(2, 3, 4, 5)
    xs = cross_scan(x)
    assert xs.shape == (2, 4, 3, 20)
    torch.testing.assert_close(xs[:, 1, :, 7], x[:, :, 7 % 4, 7 // 4])  # column-major order
    torch.testing.assert_close(cross_merge(xs, 4, 5), 4 * x)


@pytest.mark.parametrize("groups,per_group,k", [(2, 4, 3), (3, 1, 5)])
def test_grouped_conv1d_matches_conv1d(groups, per_group, k):
    """The shifted multiply-add form equals F.conv1d (same padding, one input channel per group)."""
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(5, groups, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(groups * per_group, 1, k, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(groups * per_group, generator=gen, dtype=torch.float64, requires_grad=True)
    want = F.conv1d(x, w, b, padding=k // 2, groups=groups)
    got = grouped_conv1d(x, w, b)
    torch.testing.assert_close(got, want)
    g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for a, r in zip(torch.autograd.grad(got, (x, w, b), g), torch.autograd.grad(want, (x, w, b), g)):
        torch.testing.assert_close(a, r)


def test_channel_mixer_is_token_count_free():
    """The same weights run on any number of tokens, and each token's output depends on it alone."""
    torch.manual_seed(0)
    m = SelectiveChannelMixer(6, width=10, d_state=3).eval()
    x = torch.randn(1, 3, 4, 6)
    with use_backend("torch"):
        full = m(x)
        single = m(x[:, 1:2, 2:3])
    torch.testing.assert_close(full[:, 1:2, 2:3], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(32, 32), (40, 56)])
def test_forward_shapes_and_small_input(size):
    model = _tiny().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 3)
    with pytest.raises(ValueError, match="smaller than the total stride"):
        model(torch.randn(1, 3, 31, 64))


def test_features_only_and_intermediates():
    model = timm.create_model("mz_vim2_t", features_only=True, **TINY)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    feats = model(torch.randn(1, 3, 64, 64))
    # timm keeps a model's native layout for features_only (NHWC here, as timm's MambaOut)
    assert [tuple(f.shape) for f in feats] == [(1, 16, 16, 8), (1, 8, 8, 8), (1, 4, 4, 16), (1, 2, 2, 16)]
    net = _tiny().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        final, inter = net.forward_intermediates(x, indices=[1, 3])
        torch.testing.assert_close(net.forward_head(final), net(x))
        assert net.forward_head(final, pre_logits=True).shape == (1, 16)
    assert [tuple(t.shape) for t in inter] == [(1, 8, 4, 4), (1, 16, 1, 1)]
    net.reset_classifier(7)
    assert net(x).shape == (1, 7)
    assert any("avg_weights" in n for n in net.no_weight_decay())
    assert "blocks" in net.group_matcher()


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = _tiny()
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_kernel_and_reference_paths_agree():
    """Whole tiny model, forward and every parameter gradient: Triton kernel vs sequential scan."""
    torch.manual_seed(0)
    model = ViM2(dims=(4, 8, 8, 8), token_mixers=(1, 1, 1, 1), channel_mixers=(1, 0, 0, 1), d_state=2,
                 num_classes=3)
    x = torch.randn(1, 3, 32, 32)
    results = []
    for backend in ("torch", "triton"):
        model.zero_grad()
        with use_backend(backend):
            out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (o_ref, g_ref), (o_k, g_k) = results
    torch.testing.assert_close(o_k, o_ref, rtol=1e-4, atol=1e-5)
    for name, g in g_ref.items():
        rel = ((g_k[name] - g).norm() / g.norm().clamp_min(1e-12)).item()
        assert rel < 1e-3, f"{name}: {rel:.2e}"
    # both mixers really ran through the scan (their S6 parameters received gradient)
    assert any("stages.0.blocks.0.mixers.1.mixer.ssm.A_log" in n and g.abs().sum() > 0 for n, g in g_k.items())


@pytest.mark.slow
def test_tiny_vim2_learns():
    """A few dozen AdamW steps on a synthetic two-class task (stripe orientation) cut the loss."""
    torch.manual_seed(0)
    model = ViM2(dims=(8, 8, 8, 8), token_mixers=(1, 1, 1, 1), channel_mixers=(1, 0, 0, 0), d_state=2,
                 num_classes=2)
    n = 16
    labels = torch.arange(n) % 2
    phase = torch.rand(n, 1, 1) * 6.28
    grid = torch.arange(32).float()
    horiz = torch.sin(grid[None, :, None] * 0.8 + phase).expand(n, 32, 32)
    vert = torch.sin(grid[None, None, :] * 0.8 + phase).expand(n, 32, 32)
    imgs = torch.where(labels[:, None, None].bool(), vert, horiz)[:, None].expand(n, 3, 32, 32)
    imgs = imgs + 0.3 * torch.randn(n, 3, 32, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)

    def loss_now():
        with torch.no_grad():
            return F.cross_entropy(model(imgs), labels).item()

    before = loss_now()
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(imgs), labels).backward()
        opt.step()
    after = loss_now()
    assert after < 0.3 * before, f"loss {before:.3f} -> {after:.3f}"
    with torch.no_grad():
        s6 = [m.ssm.A_log for m in model.modules() if isinstance(m, (SelectiveTokenMixer, SelectiveChannelMixer))]
    assert all(torch.isfinite(a).all() for a in s6)


def test_local_checkpoint_loads(tmp_path):
    """pretrained=True with a local file (the only way: no published weights) restores the model."""
    from metazoo.backbones._common import save_state_dict

    src = timm.create_model("mz_vim2_t", **TINY).eval()
    path = tmp_path / "vim2_tiny.safetensors"
    save_state_dict(src.state_dict(), path)
    dst = timm.create_model("mz_vim2_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                            **TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))
