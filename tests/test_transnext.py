"""TransNeXt: fused aggregated-attention kernel vs reference, mixers vs an unfold-based rendering of
the official math, the model's sizes, any-size inputs, official-layout checkpoints."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import metazoo  # noqa: F401  (registers the models)
from metazoo.backbones.transnext import TransNeXt
from metazoo.kernels.aggregated_attention import aggregated_attention, aggregated_attention_ref
from metazoo.mixers.aggregated_attention import AggregatedAttention, LengthScaledAttention, relative_position_table


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _kernel_args(B, H, W, C, heads, P, window, dtype):
    N, D, KK = H * W, C // heads, window * window
    args = [torch.randn(B, N, C), torch.randn(B, N, 2 * C), torch.randn(B, P, 2 * C),
            0.1 * torch.randn(heads, D), torch.randn(heads), 0.1 * torch.randn(heads, KK),
            torch.randn(heads, N, P), 0.2 * torch.randn(heads, D, KK), 0.1 * torch.randn(heads, KK)]
    args[:3] = [a.to(dtype) for a in args[:3]]
    return [a.requires_grad_() for a in args]


# B, H, W, C, heads, P, window: odd maps, 1-row maps (window mostly padding), pooled keys over
# several blocks (P=70 > 64), head dim 24 (padded to 32), a 5x5 window, and 72 queries (two query
# blocks: the pooled-key backward splits them over programs).
KERNEL_CASES = [
    (2, 5, 7, 48, 2, 6, 3),
    (1, 1, 6, 24, 1, 1, 3),
    (1, 9, 4, 24, 1, 70, 3),
    (2, 6, 5, 32, 2, 3, 5),
    (1, 9, 8, 16, 1, 5, 3),
]


# every shape in fp32; bf16 on the odd map and on the multi-block pooled keys (interpreter time)
KERNEL_RUNS = [(c, torch.float32) for c in KERNEL_CASES] + [(KERNEL_CASES[0], torch.bfloat16),
                                                            (KERNEL_CASES[2], torch.bfloat16)]


@pytest.mark.parametrize("case,dtype", KERNEL_RUNS,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v).split(".")[-1])
def test_kernel_matches_reference(case, dtype):
    B, H, W, C, heads, P, window = case
    args = _kernel_args(B, H, W, C, heads, P, window, dtype)
    out = aggregated_attention(*args, H, W, heads, window, backend="triton")
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, args, grad)
    # reference in fp32 from the same (possibly bf16-rounded) inputs
    ref_args = [a.detach().float().requires_grad_() for a in args]
    ref = aggregated_attention_ref(*ref_args, H, W, heads, window)
    ref_grads = torch.autograd.grad(ref, ref_args, grad.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < tol
    names = ["q", "kv", "kv_pool", "query_embedding", "temperature", "local_bias", "pool_bias", "tokens",
             "token_bias"]
    for name, g, r in zip(names, grads, ref_grads):
        assert g.shape == r.shape and torch.isfinite(g).all(), name
        assert rel_err(g, r) < tol, (name, rel_err(g, r))


def test_kernel_rejects_bad_arguments():
    args = _kernel_args(1, 3, 3, 8, 2, 2, 3, torch.float32)
    with pytest.raises(ValueError, match="height"):
        aggregated_attention_ref(*args, 3, 4, 2)
    with pytest.raises(ValueError, match="window_size"):
        aggregated_attention_ref(*args, 3, 3, 2, 4)
    with pytest.raises(ValueError, match="num_heads"):
        aggregated_attention_ref(*args, 3, 3, 3)


def test_flop_formula_matches_reference_count():
    args = [a.detach() for a in _kernel_args(1, 4, 5, 16, 2, 3, 3, torch.float32)]
    counts = []
    for backend in ("torch", "triton"):
        with FlopCounterMode(display=False) as fc:
            aggregated_attention(*args, 4, 5, 2, backend=backend)
        counts.append(fc.get_total_flops())
    assert counts[0] == counts[1] == 2 * 20 * 16 * (3 * 9 + 2 * 3)


# ---- an independent rendering of the official math (unfold, explicit masks, per-pair coordinates)

def _official_pos_bias(mod, query_hw, key_hw, pretrain_hw):
    """The MLP evaluated on every (query, pooled-key centre) pair, no de-duplication."""
    def centres(n_q, n_k):  # adaptive average pooling of 0..n_q-1 into n_k bins
        return torch.tensor([sum(range(math.floor(i * n_q / n_k), math.ceil((i + 1) * n_q / n_k)))
                             / (math.ceil((i + 1) * n_q / n_k) - math.floor(i * n_q / n_k)) for i in range(n_k)])
    qy, qx = torch.meshgrid(torch.arange(query_hw[0]).float(), torch.arange(query_hw[1]).float(), indexing="ij")
    ky, kx = torch.meshgrid(centres(query_hw[0], key_hw[0]), centres(query_hw[1], key_hw[1]), indexing="ij")
    dy = (qy.reshape(-1, 1) - ky.reshape(1, -1)) / (pretrain_hw[0] - 1) * 8
    dx = (qx.reshape(-1, 1) - kx.reshape(1, -1)) / (pretrain_hw[1] - 1) * 8
    coords = torch.stack([dy, dx], -1)
    coords = torch.sign(coords) * torch.log2(coords.abs() + 1) / 3
    return mod.cpb_fc2(torch.relu(mod.cpb_fc1(coords))).permute(2, 0, 1)  # heads, Nq, Nk


def official_aggregated_attention(mod, x, H, W):
    B, N, C = x.shape
    h, d, ws = mod.num_heads, mod.head_dim, mod.window_size
    ph, pw = max(1, H // mod.sr_ratio), max(1, W // mod.sr_ratio)
    ones = F.unfold(torch.ones(1, 1, H, W), ws, padding=ws // 2)  # 1, ws*ws, N
    mask = (ones[0].t() == 0)  # N, ws*ws
    scale = torch.log(ones[0].sum(0) + ph * pw).reshape(N, 1)
    qn = F.normalize(mod.q(x).reshape(B, N, h, d).transpose(1, 2), dim=-1)
    qs = (qn + mod.query_embedding) * F.softplus(mod.temperature) * scale
    k, v = mod.kv(x).chunk(2, -1)
    k = F.normalize(k.reshape(B, N, h, d), dim=-1).reshape(B, N, C)
    kv_map = torch.cat([k, v], -1).transpose(1, 2).reshape(B, 2 * C, H, W)
    k_loc, v_loc = F.unfold(kv_map, ws, padding=ws // 2).reshape(B, 2 * h, d, ws * ws, N).permute(
        0, 1, 4, 2, 3).chunk(2, dim=1)  # B h N d ws*ws
    a_loc = (qs.unsqueeze(-2) @ k_loc).squeeze(-2) + mod.relative_pos_bias_local.unsqueeze(1)
    a_loc = a_loc.masked_fill(mask, float("-inf"))
    pooled = F.adaptive_avg_pool2d(mod.act(mod.sr(x.transpose(1, 2).reshape(B, C, H, W))), (ph, pw))
    pooled = mod.norm(pooled.reshape(B, C, -1).transpose(1, 2))
    kp, vp = mod.kv(pooled).reshape(B, ph * pw, 2 * h, d).transpose(1, 2).chunk(2, dim=1)
    a_pool = qs @ F.normalize(kp, dim=-1).transpose(-2, -1) + _official_pos_bias(mod, (H, W), (ph, pw),
                                                                                  mod.pretrain_hw)
    attn = torch.cat([a_loc, a_pool], -1).softmax(-1)
    a_loc, a_pool = attn.split([ws * ws, ph * pw], -1)
    dyn = qn @ mod.learnable_tokens + mod.learnable_bias
    out = ((a_loc + dyn).unsqueeze(-2) @ v_loc.transpose(-2, -1)).squeeze(-2) + a_pool @ vp
    return mod.proj(out.transpose(1, 2).reshape(B, N, C))


def official_plain_attention(mod, x, H, W):
    B, N, C = x.shape
    q, k, v = mod.qkv(x).reshape(B, N, 3 * mod.num_heads, mod.head_dim).transpose(1, 2).chunk(3, dim=1)
    bias = _official_pos_bias(mod, (H, W), (H, W), mod.pretrain_hw)
    attn = ((F.normalize(q, dim=-1) + mod.query_embedding) * F.softplus(mod.temperature) * math.log(N)) \
        @ F.normalize(k, dim=-1).transpose(-2, -1) + bias
    return mod.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C))


def _randomise(mod):
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return mod


@pytest.mark.parametrize("H,W,sr", [(7, 9, 2), (8, 8, 4), (5, 3, 8)])
def test_aggregated_attention_mixer_matches_official_math(H, W, sr):
    mod = _randomise(AggregatedAttention(32, 2, sr, pretrain_hw=(8, 8))).eval()
    x = torch.randn(2, H * W, 32)
    with torch.no_grad():
        expected = official_aggregated_attention(mod, x, H, W)
        for backend in ("torch", "triton"):
            mod.backend = backend
            assert rel_err(mod(x, H, W), expected) < 1e-5, backend


def test_plain_attention_mixer_matches_official_math():
    mod = _randomise(LengthScaledAttention(32, 4, pretrain_hw=(7, 7))).eval()
    x = torch.randn(2, 35, 32)
    with torch.no_grad():
        assert rel_err(mod(x, 5, 7), official_plain_attention(mod, x, 5, 7)) < 1e-5


# ---- the model

PAPER = {  # params (M), MACs (G) at the default resolution
    "mz_transnext_micro": (12.8, 2.7, 224), "mz_transnext_tiny": (28.2, 5.7, 224),
    "mz_transnext_small": (49.7, 10.3, 224), "mz_transnext_base": (89.7, 18.4, 224),
    "mz_transnext_micro_aaaa": (13.1, 3.3, 256),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_params_and_macs_match_paper(name):
    params, macs, size = PAPER[name]
    with torch.device("meta"):
        model = timm.create_model(name).eval()
    model.to("meta")
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 / params - 1) < 0.01
    with FlopCounterMode(display=False) as fc:
        model(torch.empty(1, 3, size, size, device="meta"))
    assert abs(fc.get_total_flops() / 2e9 / macs - 1) < 0.03


def official_state_dict_keys(depths, sr_ratios):
    """Parameter names of the official classification model (Attention when sr == 1)."""
    keys = {"head.weight", "head.bias"}
    for i, (depth, sr) in enumerate(zip(depths, sr_ratios), start=1):
        keys |= {f"patch_embed{i}.{m}.{p}" for m in ("proj", "norm") for p in ("weight", "bias")}
        keys |= {f"norm{i}.weight", f"norm{i}.bias"}
        for j in range(depth):
            b = f"block{i}.{j}"
            keys |= {f"{b}.{m}.{p}" for m in ("norm1", "norm2", "mlp.fc1", "mlp.fc2", "mlp.dwconv.dwconv",
                                               "attn.proj", "attn.cpb_fc1", "attn.cpb_fc2") for p in ("weight", "bias")}
            keys |= {f"{b}.attn.temperature", f"{b}.attn.query_embedding"}
            if sr == 1:
                keys |= {f"{b}.attn.qkv.weight", f"{b}.attn.qkv.bias"}
            else:
                keys |= {f"{b}.attn.{m}.{p}" for m in ("q", "kv", "sr", "norm") for p in ("weight", "bias")}
                keys |= {f"{b}.attn.{p}" for p in ("relative_pos_bias_local", "learnable_tokens", "learnable_bias")}
    return keys


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    model = timm.create_model("mz_transnext_micro").eval()
    _randomise(model)  # non-trivial biases, temperatures and position MLPs
    return model


def test_state_dict_has_official_layout(micro):
    assert set(micro.state_dict()) == official_state_dict_keys((2, 2, 15, 2), (8, 4, 2, 1))
    with torch.device("meta"):
        aaaa = timm.create_model("mz_transnext_micro_aaaa")
    assert set(aaaa.state_dict()) == official_state_dict_keys((2, 2, 15, 2), (16, 8, 4, 2))


def test_official_checkpoint_loads_strictly(micro, tmp_path):
    path = tmp_path / "transnext_micro_224_1k.pth"
    torch.save({"model": micro.state_dict()}, path)
    loaded = timm.create_model("mz_transnext_micro", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), micro(x))
    with pytest.raises(RuntimeError, match="Missing"):
        loaded.load_state_dict({k: v for k, v in micro.state_dict().items() if "block1.0" not in k})


@pytest.mark.slow
def test_model_at_224_and_odd_size_kernel_matches_reference(micro):
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        from metazoo.kernels import use_backend
        with use_backend("torch"):
            ref = micro(x)
        assert ref.shape == (1, 1000) and torch.isfinite(ref).all()
        odd = torch.randn(1, 3, 97, 131)
        with use_backend("torch"):
            ref_odd = micro(odd)
        with use_backend("triton"):
            out_odd = micro(odd)
        assert rel_err(out_odd, ref_odd) < 1e-4
        # tables built for stage 1's 25x33 map (not the construction size) and its 3x4 pooled keys
        assert micro.block1.position_tables(25, 33)[0].numel() == 25 * 33 * 3 * 4


def test_odd_size_backward_kernel_matches_reference():
    torch.manual_seed(1)
    model = _randomise(TransNeXt(img_size=64, pretrain_size=224, embed_dims=(16, 32, 32, 32), num_heads=(1, 2, 2, 2),
                                 depths=(1, 1, 1, 1), num_classes=5))
    x = torch.randn(2, 3, 45, 37)
    from metazoo.kernels import use_backend
    grads = []
    for backend in ("torch", "triton"):
        model.zero_grad()
        with use_backend(backend):
            model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:  # absolute floor: some grads are zero up to rounding (softmax shift invariance)
        assert (grads[1][n] - grads[0][n]).norm() <= 1e-4 * grads[0][n].norm() + 1e-7, n


def test_features_only_and_input_checks():
    model = timm.create_model("mz_transnext_micro", features_only=True, embed_dims=(16, 32, 32, 32),
                              num_heads=(1, 2, 2, 2), depths=(1, 1, 1, 1))
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    feats = model(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 16, 24), (32, 8, 12), (32, 4, 6), (32, 2, 3)]
    with pytest.raises(ValueError, match="32"):
        model(torch.randn(1, 3, 31, 64))
    with pytest.raises(ValueError, match="tag"):
        timm.create_model("mz_transnext_micro.nonexistent")


@pytest.mark.parametrize("which", ["convglu", "pooled_branch"])
def test_recompute_gives_the_same_gradients(which):
    from metazoo.mixers.convglu import ConvGLU
    if which == "convglu":
        mod, flag = ConvGLU(8, 24), "recompute_gate"
    else:
        mod, flag = AggregatedAttention(8, 2, 2, pretrain_hw=(4, 4), backend="torch"), "recompute_pool"
    x = torch.randn(2, 15, 8, requires_grad=True)
    grads = []
    for recompute in (False, True):
        setattr(mod, flag, recompute)
        mod.zero_grad()
        x.grad = None
        mod(x, 3, 5).square().sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in mod.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_convglu_split_fc1_under_compile_matches_eager(monkeypatch):
    """Under torch.compile fc1 runs as two GEMMs over its weight's row blocks: same values and grads."""
    from metazoo.mixers.convglu import ConvGLU
    mod = ConvGLU(8, 24, recompute_gate=False)
    x = torch.randn(2, 15, 8, requires_grad=True)
    results = []
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        mod.zero_grad()
        x.grad = None
        out = mod(x, 3, 5)
        out.square().sum().backward()
        results.append([out.detach()] + [x.grad.clone()] + [p.grad.clone() for p in mod.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_recompute_parts():
    from metazoo.backbones.transnext import recompute_parts
    assert recompute_parts(True) == {"gate", "pool"} and recompute_parts(False) == set()
    assert recompute_parts(["gate"]) == {"gate"} and recompute_parts("pool") == {"pool"}
    model = timm.create_model("mz_transnext_micro", recompute=("gate",), depths=(1, 1, 1, 1))
    assert model.block1[0].mlp.recompute_gate and not model.block1[0].attn.recompute_pool
    with pytest.raises(ValueError, match="recompute"):
        timm.create_model("mz_transnext_micro", recompute="everything")


def test_compiled_model_has_no_graph_break_at_any_size():
    """Under torch.compile the position tables of any input size are traced (built from the sizes, no
    torch.unique): one graph, no break, at the construction size and at others."""
    torch._dynamo.reset()
    model = TransNeXt(img_size=64, embed_dims=(16, 32, 32, 32), num_heads=(1, 2, 2, 2), depths=(1, 1, 1, 1),
                      num_classes=5, backend="torch").eval()
    with torch.no_grad():
        for size in ((64, 64), (96, 64)):
            explained = torch._dynamo.explain(model)(torch.randn(1, 3, *size))
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def _unique_table(query_hw, key_hw, pretrain_hw):
    """The official construction: every (query, pooled-key centre) offset, de-duplicated by torch.unique."""
    axes_q = [torch.arange(n, dtype=torch.float32) for n in query_hw]
    axes_k = [F.adaptive_avg_pool1d(a[None], k)[0] for a, k in zip(axes_q, key_hw)]
    qh, qw = (t.reshape(-1) for t in torch.meshgrid(*axes_q, indexing="ij"))
    kh, kw = (t.reshape(-1) for t in torch.meshgrid(*axes_k, indexing="ij"))
    rel = torch.stack([(qh[:, None] - kh[None, :]) / (pretrain_hw[0] - 1) * 8,
                       (qw[:, None] - kw[None, :]) / (pretrain_hw[1] - 1) * 8], dim=-1).reshape(-1, 2)
    table, index = torch.unique(rel, return_inverse=True, dim=0)
    return index.reshape(-1), torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


@pytest.mark.parametrize("query_hw,key_hw,pretrain_hw", [((56, 56), (7, 7), (56, 56)), ((25, 33), (3, 4), (56, 56)),
                                                         ((7, 9), (7, 9), (7, 7)), ((10, 11), (3, 3), (14, 14)),
                                                         ((5, 5), (1, 1), (14, 14))])
def test_position_table_from_sizes_equals_the_unique_table(query_hw, key_hw, pretrain_hw):
    """The table built from the sizes alone equals torch.unique's, bit for bit (odd and uneven pooling bins too),
    and TorchScript compiles it."""
    want = _unique_table(query_hw, key_hw, pretrain_hw)
    got = relative_position_table(query_hw, key_hw, pretrain_hw, torch.device("cpu"))
    scripted = torch.jit.script(relative_position_table)(query_hw, key_hw, pretrain_hw, torch.device("cpu"))
    for g, s, w in zip(got, scripted, want):
        assert torch.equal(g, w) and torch.equal(s, w)
