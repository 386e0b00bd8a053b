"""Each Triton kernel against its plain-PyTorch ``*_ref``: forward and backward, fp32 and bf16.

On CPU the kernels run in Triton's interpreter (tests/conftest.py), so shapes stay tiny; they are
drawn at random (seeded) and are mostly not multiples of the block sizes. The reference runs in
float64 on upcast copies of the same inputs; errors are relative (||a - b|| / ||b||).
"""
from __future__ import annotations

import contextlib
import random
from functools import partial
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from metazoo.kernels import dispatch
from metazoo.kernels.act_linear import act_linear, act_linear_ref
from metazoo.kernels.dwconv import dwconv2d, dwconv2d_ref
from metazoo.kernels.gated_conv import (gated_dwconv, gated_dwconv_linear, gated_dwconv_linear_ref,
                                        gated_dwconv_ref)
from metazoo.kernels.group_norm import group_norm1, group_norm1_ref
from metazoo.kernels.norm_linear import norm_linear, norm_linear_ref
from metazoo.kernels.norm_residual import layer_norm, layer_norm_ref, norm_residual, norm_residual_ref, scale_add
from metazoo.kernels.pool_mixer import pool_mixer, pool_mixer_ref
from metazoo.kernels.star_relu import star_relu, star_relu_ref

pytestmark = pytest.mark.skipif(not (dispatch.triton_available() and (torch.cuda.is_available()
                                                                       or dispatch.interpret_mode())),
                                reason="needs Triton (GPU, or TRITON_INTERPRET=1 on CPU)")

N_SHAPES = 20
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values in the kernel's result"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare(fn, ref, acts: dict, params: dict, dtype, kwargs: dict, tol_override: dict | None = None):
    """Run ``fn`` (Triton) on ``acts`` cast to ``dtype`` (params stay fp32, as under autocast) and
    ``ref`` in float64; compare every output and the gradient of every input (``tol_override``:
    per-name tolerances where the dtype's rounding is amplified, e.g. a reduction that cancels)."""
    def leaves(cast_act, cast_par):
        a = {k: v.to(dtype).to(cast_act).requires_grad_() for k, v in acts.items()}
        p = {k: (v.to(cast_par).requires_grad_() if v is not None else None) for k, v in params.items()}
        return a, p

    a_k, p_k = leaves(dtype, torch.float32)
    a_r, p_r = leaves(torch.float64, torch.float64)
    outs_k = [o for o in _as_tuple(fn(**a_k, **p_k, **kwargs, backend="triton")) if torch.is_tensor(o)]
    outs_r = [o for o in _as_tuple(ref(**a_r, **p_r, **kwargs)) if torch.is_tensor(o)]
    gen = torch.Generator().manual_seed(123)
    # Both sides see the same incoming gradient: rounded to the kernel output's dtype.
    cots = [torch.randn(o.shape, generator=gen).to(k.dtype).to(o.device).double() for o, k in zip(outs_r, outs_k)]
    ins_k = list(a_k.values()) + [v for v in p_k.values() if v is not None]
    ins_r = list(a_r.values()) + [v for v in p_r.values() if v is not None]
    g_k = torch.autograd.grad(sum((o.double() * c).sum() for o, c in zip(outs_k, cots)), ins_k, allow_unused=True)
    g_r = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs_r, cots)), ins_r, allow_unused=True)
    names = [f"out{i}" for i in range(len(outs_k))] + [f"d_{k}" for k in a_k] + \
        [f"d_{k}" for k, v in p_k.items() if v is not None]
    for name, k, r in zip(names, list(outs_k) + list(g_k), list(outs_r) + list(g_r)):
        tol = (tol_override or {}).get(name, TOL[dtype])
        if r is None or r.norm() < 1e-10:  # e.g. the pooling mixer's norm bias cancels exactly
            assert k is None or k.double().norm() < 1e-4, f"{name}: expected a zero gradient"
            continue
        assert k is not None, f"{name}: no gradient from the kernel"
        assert k.shape == r.shape, f"{name}: shape {tuple(k.shape)} != {tuple(r.shape)}"
        err = rel_err(k, r)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e} ({dtype})"


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _rand(*shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, device=DEVICE) * scale + shift


def _keep(B: int) -> torch.Tensor:
    """A drop-path keep vector (mask / (1 - p)) with kept, dropped and differently scaled samples."""
    return torch.tensor([1.25, 0.0, 2.5, 1.25], device=DEVICE)[:B]


def _map_shape(rng: random.Random, max_hw=7, max_c=40):
    return rng.randint(1, 2), rng.randint(1, max_c), rng.randint(1, max_hw), rng.randint(1, max_hw)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("seed", range(N_SHAPES))
def test_norm_residual(seed, dtype):
    rng = random.Random(seed)
    channels_first = seed % 2 == 0
    if channels_first:
        B, C, H, W = _map_shape(rng, max_c=80)
        shape = (B, C, H, W)
    else:
        C = rng.randint(1, 300)
        shape = (rng.randint(1, 3), rng.randint(1, 11), C)
    with_y, with_norm = [(True, True), (False, True), (True, False)][seed % 3]
    acts = {"x": _rand(*shape, scale=2.0, shift=0.5)}
    if with_y:
        acts["y"] = _rand(*shape)
    params = {"rs": _rand(C) if with_y and seed % 4 != 1 else None, "ls": _rand(C) if with_y else None,
              "weight": _rand(C) if with_norm else None, "bias": _rand(C) if with_norm and seed % 5 else None}
    keep = _keep(shape[0]) if with_y and seed % 4 != 2 else None
    compare(norm_residual, norm_residual_ref, acts, params, dtype,
            dict(eps=1e-6, channels_first=channels_first, keep=keep))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("seed", range(N_SHAPES))
def test_star_relu(seed, dtype):
    rng = random.Random(seed)
    shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(0, 2))) + (rng.randint(1, 300),)
    compare(star_relu, star_relu_ref, {"x": _rand(*shape)}, {"scale": _rand(1), "bias": _rand(1)}, dtype, {})


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("seed", range(N_SHAPES))
def test_dwconv(seed, dtype):
    rng = random.Random(seed)
    K = 7 if seed % 5 == 0 else (5 if seed % 5 == 1 else 3)  # the interpreter pays per tap: few large K
    B, C, H, W = _map_shape(rng, max_hw=4 if K == 7 else 5, max_c=70)
    channels_first = seed % 2 == 0
    act = seed % 3 != 1
    x = _rand(B, C, H, W) if channels_first else _rand(B, H, W, C)
    params = {"weight": _rand(C, 1, K, K) / K, "bias": _rand(C) if seed % 2 else None,
              "act_scale": _rand(1) if act else None, "act_bias": _rand(1) if act else None}
    compare(dwconv2d, dwconv2d_ref, {"x": x}, params, dtype, dict(channels_first=channels_first))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("seed", range(N_SHAPES))
def test_gated_dwconv(seed, dtype):
    rng = random.Random(seed)
    K = 7 if seed % 5 == 0 else 3
    B, _, H, W = _map_shape(rng, max_hw=4 if K == 7 else 5)
    hidden = rng.randint(2, 48)
    cc = rng.randint(1, hidden)
    params = {"weight": _rand(cc, 1, K, K) / K, "bias": _rand(cc) if seed % 4 else None}
    compare(gated_dwconv, gated_dwconv_ref, {"u": _rand(B, H, W, 2 * hidden)}, params, dtype, dict(hidden=hidden))


def test_gated_dwconv_linear_backward_runs_the_conv_once(monkeypatch):
    """Training runs the depthwise conv twice per block: forward, and one recompute serving both h
    (fc2's gradients) and the gate's backward (the profile showed three before). Backward copies the
    strided conv channels of u once, densely, for the recompute and the weight gradient (cuDNN would
    copy the strided slice once for each)."""
    from metazoo.kernels import dwconv, gated_conv

    calls, grads = [], []
    forward, backward = dwconv.conv_forward, dwconv.conv_backward
    monkeypatch.setattr(dwconv, "conv_forward", lambda x, *a, **k: calls.append(x) or forward(x, *a, **k))
    monkeypatch.setattr(dwconv, "conv_backward", lambda g, x, *a, **k: grads.append(x) or backward(g, x, *a, **k))
    u = _rand(2, 5, 6, 16).requires_grad_(True)
    w, fw = _rand(6, 1, 3, 3).requires_grad_(True), _rand(4, 8).requires_grad_(True)
    gated_conv.gated_dwconv_linear(u, w, None, 8, fw, None, backend="triton").sum().backward()
    assert len(calls) == 2 and len(grads) == 1, (len(calls), len(grads))
    assert not calls[0].is_contiguous()  # forward reads the slice of u in place
    assert calls[1] is grads[0] and grads[0].is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("seed", range(N_SHAPES))
def test_gated_dwconv_linear(seed, dtype):
    """The gate fused with fc2 (h recomputed in backward) against fc2(gated_dwconv_ref(u))."""
    rng = random.Random(1000 + seed)
    K = 7 if seed % 5 == 0 else 3
    B, _, H, W = _map_shape(rng, max_hw=4 if K == 7 else 5)
    hidden, out = rng.randint(2, 48), rng.randint(1, 40)
    cc = rng.randint(1, hidden)
    params = {"weight": _rand(cc, 1, K, K) / K, "bias": _rand(cc) if seed % 4 else None,
              "fc_weight": _rand(out, hidden) / hidden ** 0.5, "fc_bias": _rand(out) if seed % 3 else None}
    compare(gated_dwconv_linear, gated_dwconv_linear_ref, {"u": _rand(B, H, W, 2 * hidden)}, params, dtype,
            dict(hidden=hidden))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("seed", range(N_SHAPES))
def test_act_linear(seed, dtype):
    """fc2(act(z)) with act recomputed in backward: GELU / StarReLU, Linear / 1x1 conv (NCHW, channels_last)."""
    rng = random.Random(2000 + seed)
    act = ("gelu", "star_relu")[seed % 2]
    channels_first = seed % 4 >= 2
    hidden, out = rng.randint(1, 70), rng.randint(1, 40)
    if channels_first:
        B, _, H, W = _map_shape(rng)
        z = _rand(B, hidden, H, W)
        if seed % 3 == 0:
            z = z.to(memory_format=torch.channels_last)
        fc_weight = _rand(out, hidden, 1, 1) / hidden ** 0.5
    else:
        z = _rand(*[rng.randint(1, 4) for _ in range(rng.randint(1, 3))], hidden)
        fc_weight = _rand(out, hidden) / hidden ** 0.5
    params = {"fc_weight": fc_weight, "fc_bias": _rand(out) if seed % 5 else None,
              "act_scale": _rand(1) if act == "star_relu" else None,
              "act_bias": _rand(1) if act == "star_relu" else None}
    # StarReLU's scalar grads sum da * relu(z)^2 over every element; in bf16, da = dy @ W is rounded
    # first (as the unfused autocast MLP rounds fc2's input grad), and the signed sum cancels.
    loose = {"d_act_scale": 0.1, "d_act_bias": 0.1} if dtype == torch.bfloat16 else None
    compare(act_linear, act_linear_ref, {"z": z}, params, dtype, dict(act=act, channels_first=channels_first),
            tol_override=loose)


def test_act_linear_saves_only_its_input():
    z = _rand(2, 24, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    s, b = _rand(1), _rand(1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        act_linear(z, _rand(5, 24, 1, 1), None, "star_relu", s, b, channels_first=True, backend="triton")
    assert saved.count(z.numel()) == 1  # z itself; act(z) is recomputed in backward


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("seed", range(8))
def test_norm_linear(seed, dtype):
    """fc(norm(x)) with norm(x) recomputed in backward: LayerNorm + Linear over the last dim, LayerNorm /
    one-group GroupNorm + 1x1 conv over NCHW."""
    rng = random.Random(3000 + seed)
    channels_first = seed % 2 == 1
    norm = "group1" if seed % 4 == 3 else "layer"
    C, out = rng.randint(1, 70), rng.randint(1, 40)
    if channels_first:
        B, _, H, W = _map_shape(rng)
        x = _rand(B, C, H, W, scale=2.0, shift=0.5)
        fc_weight = _rand(out, C, 1, 1) / C ** 0.5
    else:
        x = _rand(*[rng.randint(1, 4) for _ in range(rng.randint(1, 3))], C, scale=2.0, shift=0.5)
        fc_weight = _rand(out, C) / C ** 0.5
    params = {"weight": _rand(C), "bias": _rand(C) if seed % 3 else None, "fc_weight": fc_weight,
              "fc_bias": _rand(out) if seed % 4 else None}
    compare(norm_linear, norm_linear_ref, {"x": x}, params, dtype, dict(eps=1e-6, channels_first=channels_first,
                                                                       norm=norm))


def test_norm_linear_keeps_the_stream_not_the_normalised_copy():
    """Under autocast only the fp32 input is kept at the input's size (the norm's backward reads it);
    LayerNorm + Linear also keep the normalised copy. The output is autocast's linear's."""
    x, w, fc = (t.requires_grad_() for t in (_rand(2, 3, 5, 24), _rand(24), _rand(7, 24)))

    def kept(fn):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
                torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = fn(x, w, None, 1e-6, fc, None)
        return y, [t.dtype for t in saved if t.numel() == x.numel()]

    y, ours = kept(partial(norm_linear, backend="triton"))
    y_ref, plain = kept(norm_linear_ref)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert ours == [torch.float32] and len(plain) == 2, (ours, plain)


def test_norm_residual_saves_only_what_backward_reads():
    """x is kept only for rs's grad, y only for ls's grad, the summed stream only for the norm."""
    x, y = _rand(2, 3, 16).requires_grad_(), _rand(2, 3, 16).to(torch.bfloat16).requires_grad_()

    def saved_ptrs(**kw):
        ptrs = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: ptrs.append(t.data_ptr()) or t, lambda t: t):
            out, _ = norm_residual(x, y, backend="triton", **kw)
        return ptrs, out

    ptrs, _ = saved_ptrs()  # plain residual add: nothing
    assert x.data_ptr() not in ptrs and y.data_ptr() not in ptrs
    ptrs, _ = saved_ptrs(rs=_rand(16), ls=_rand(16))
    assert x.data_ptr() in ptrs and y.data_ptr() in ptrs
    ptrs, out = saved_ptrs(weight=_rand(16))
    assert ptrs.count(out.data_ptr()) == 1 and x.data_ptr() not in ptrs and y.data_ptr() not in ptrs


def test_gated_dwconv_linear_saves_only_its_input():
    """Autograd keeps u (and the parameters), not the hidden activation h, across the fused op."""
    u = _rand(2, 5, 5, 2 * 16).requires_grad_()
    w, fw = _rand(8, 1, 3, 3), _rand(12, 16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        gated_dwconv_linear(u, w, None, 16, fw, None, backend="triton")
    assert (2, 5, 5, 16) not in saved and (2, 5, 5, 32) in saved


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("seed", range(N_SHAPES))
def test_group_norm1(seed, dtype):
    rng = random.Random(seed)
    B, C, H, W = _map_shape(rng, max_hw=9, max_c=90)
    params = {"weight": _rand(C), "bias": _rand(C) if seed % 2 else None}
    compare(group_norm1, group_norm1_ref, {"x": _rand(B, C, H, W, scale=3.0, shift=4.0)}, params, dtype,
            dict(eps=1e-5))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("seed", range(N_SHAPES))
def test_pool_mixer(seed, dtype):
    rng = random.Random(seed)
    B, C, H, W = _map_shape(rng, max_hw=8, max_c=70)
    params = {"norm_weight": _rand(C), "norm_bias": _rand(C) if seed % 2 else None,
              "ls": _rand(C) if seed % 3 else None, "rs": _rand(C) if seed % 4 == 0 else None}
    compare(pool_mixer, pool_mixer_ref, {"x": _rand(B, C, H, W, scale=2.0, shift=1.0)}, params, dtype,
            dict(eps=1e-5, pool_size=3, keep=_keep(B) if seed % 2 == 0 else None))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_pool_mixer_moments_feed_group_norm(dtype):
    """The moments the pooling pass returns give the same GroupNorm as recomputing them."""
    x = _rand(2, 12, 5, 6, scale=2.0, shift=3.0).to(dtype)
    w, ls = _rand(12), _rand(12)
    out, moments = pool_mixer(x, w, None, 1e-5, ls, None, backend="triton")
    n_hint = group_norm1(out, w, None, 1e-6, moments=moments, backend="triton")
    n_ref = group_norm1_ref(out.double(), w.double(), None, 1e-6)
    assert rel_err(n_hint, n_ref) < TOL[dtype]
    fc = _rand(5, 12, 1, 1)
    z_hint = norm_linear(out, w, None, 1e-6, fc, None, True, "group1", moments=moments, backend="triton")
    z_ref = norm_linear_ref(out.double(), w.double(), None, 1e-6, fc.double(), None, True, "group1")
    assert rel_err(z_hint, z_ref) < TOL[dtype]


def test_interpreter_rounds_bf16_like_the_gpu():
    """A kernel's fp32 -> bf16 store rounds to nearest even, as torch and the GPU do (Triton's CPU
    interpreter is patched to, tests/conftest.py): the bf16 errors measured on CPU are the GPU's."""
    from metazoo.kernels.norm_residual import _fwd

    x = torch.randn(1, 4099, device=DEVICE) * 3
    x[0, :4] = torch.tensor([1 + 0.75 * 2 ** -7, 1 + 0.5 * 2 ** -7, 1 + 1.5 * 2 ** -7, -(1 + 0.75 * 2 ** -7)])  # ties: even
    out = _fwd(x, torch.zeros_like(x), None, None, None, None, 0.0, False, torch.bfloat16, torch.bfloat16,
               None)[0]
    assert out.dtype == torch.bfloat16 and torch.equal(out, x.to(torch.bfloat16))


def _autocast_cases(norms_fp32: bool):
    """(name, kernel outputs, expected dtypes) of each fused op on bf16 activations and fp32 parameters
    under autocast; ``norms_fp32``: the device's autocast runs norms in fp32 (CUDA)."""
    bf, f32 = torch.bfloat16, torch.float32
    norm = f32 if norms_fp32 else bf
    x, y = _rand(2, 6, 3, 5).to(bf), _rand(2, 6, 3, 5).to(bf)
    w, ls = _rand(6), _rand(6)
    kw = dict(channels_first=True, backend="triton")
    return [
        ("scaled residual", norm_residual(x, y, None, ls, w, **kw), (f32, f32)),
        ("residual, norm", norm_residual(x, y, None, None, w, **kw), (bf, norm)),
        ("n_dtype given", norm_residual(x, y, None, ls, w, **kw, n_dtype=bf), (f32, bf)),
        ("layer_norm", (layer_norm(x, w, **kw),), (norm,)),
        ("scale_add", (scale_add(x, y, ls, None, **kw),), (f32,)),
        ("scale_add, no scales", (scale_add(x, y, None, None, **kw),), (bf,)),
        ("group_norm1", (group_norm1(x, w, backend="triton"),), (norm,)),
        ("pool_mixer with ls", pool_mixer(x, w, None, 1e-5, ls, backend="triton")[:1], (f32,)),
        ("pool_mixer", pool_mixer(x, w, None, 1e-5, None, backend="triton")[:1], (norm,)),
    ]


@pytest.mark.parametrize("norms_fp32", [False, True], ids=["norms_as_input", "norms_fp32"])
def test_outputs_take_the_plain_ops_dtypes_under_autocast(norms_fp32, monkeypatch):
    """Under autocast each fused op returns the dtypes of the plain ops it replaces: an fp32 scale
    makes the residual stream fp32, and norms follow the device's autocast (fp32 on CUDA; emulated on
    CPU), so the stream keeps timm's precision. Where the plain path is what runs here, its dtypes are
    also checked directly."""
    from metazoo.kernels import dtypes

    plain_norms_fp32 = DEVICE in dtypes.NORMS_FP32_UNDER_AUTOCAST
    if norms_fp32 != plain_norms_fp32:
        monkeypatch.setattr(dtypes, "NORMS_FP32_UNDER_AUTOCAST", {DEVICE} if norms_fp32 else set())
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        for name, outs, want in _autocast_cases(norms_fp32):
            assert tuple(o.dtype for o in outs) == want, name
        if norms_fp32 == plain_norms_fp32:
            x, w = _rand(2, 6, 3, 5).to(torch.bfloat16), _rand(6)
            norm = torch.float32 if norms_fp32 else torch.bfloat16
            assert layer_norm_ref(x, w, channels_first=True).dtype == group_norm1_ref(x, w).dtype == norm


class _OpLog(TorchDispatchMode):
    """Records the aten ops run under it: their names, and how many made a 0-size tensor outside
    Triton's CPU interpreter (which allocates its own scratch)."""

    def __init__(self):
        super().__init__()
        self.names, self.zero_size = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.names.append(str(func.overloadpacket))
        if isinstance(out, torch.Tensor) and out.numel() == 0:
            self.zero_size += not any("triton" in f.filename for f in traceback.extract_stack())
        return out


def test_channels_last_maps_are_read_in_place(monkeypatch):
    """NCHW maps in channels_last memory go through the row kernels with no permute or copy, forward
    and backward (each such view is a host-side op), and come out channels_last, equal to the reference."""
    from metazoo.kernels import _autograd

    # The logging mode below is a dispatch mode, which routes calls to the registered ops; log what
    # plain eager runs instead (as bench/op_count.py does).
    monkeypatch.setattr(_autograd, "_traced", lambda args: False)
    cl = torch.channels_last
    x = _rand(2, 12, 5, 6, scale=2.0, shift=1.0).to(memory_format=cl).requires_grad_()
    y = _rand(2, 12, 5, 6).to(memory_format=cl)
    w, b, ls = _rand(12), _rand(12), _rand(12)
    wk, s1, b1 = _rand(12, 1, 3, 3) / 3, _rand(1), _rand(1)
    calls = {"norm_residual": lambda v: norm_residual(v, y, None, ls, w, b, channels_first=True, backend="triton"),
             "group_norm1": lambda v: (group_norm1(v, w, b, backend="triton"),),
             "pool_mixer": lambda v: (pool_mixer(v, w, b, 1e-5, ls, None, backend="triton")[0],),
             "dwconv2d": lambda v: (dwconv2d(v, wk, b, s1, b1, backend="triton"),)}
    refs = {"norm_residual": lambda v: norm_residual_ref(v, y, None, ls, w, b, channels_first=True),
            "group_norm1": lambda v: (group_norm1_ref(v, w, b),),
            "pool_mixer": lambda v: (pool_mixer_ref(v, w, b, 1e-5, ls, None)[0],),
            "dwconv2d": lambda v: (dwconv2d_ref(v, wk, b, s1, b1),)}
    for name, call in calls.items():
        with _OpLog() as ops:
            outs = call(x)
            g = [torch.ones_like(o).to(memory_format=cl) for o in outs]
            torch.autograd.backward(outs, g)
        # (copy_ is left out: Triton's CPU interpreter copies every launch's buffers back with it)
        moved = [n for n in ops.names if n in ("aten.permute", "aten.clone", "aten.contiguous")]
        assert not moved, f"{name}: layout ops {moved}"
        assert all(o.is_contiguous(memory_format=cl) for o in outs), name
        for o, r in zip(outs, refs[name](x.detach())):
            assert rel_err(o, r) < TOL[torch.float32], name
        x.grad = None


def test_absent_outputs_are_none_in_eager_and_empty_in_the_op(monkeypatch):
    """Outputs a call does not produce cost no allocation in eager calls (host time), while the
    registered op, which cannot return None, still returns 0-size tensors."""
    from metazoo.kernels import _autograd

    # The counting mode below is a dispatch mode, which routes backward to the registered op; count
    # what plain eager runs instead (as bench/op_count.py does).
    monkeypatch.setattr(_autograd, "_traced", lambda args: False)
    x, w = _rand(3, 5, 16).requires_grad_(), _rand(16).requires_grad_()
    with _OpLog() as zs:
        _, n = norm_residual(x, weight=w, backend="triton")  # no residual, no bias: 3 absent outputs
        n.sum().backward()
    assert zs.zero_size == 0
    ref_n = norm_residual_ref(x.detach(), weight=w.detach())[1]
    assert rel_err(n, ref_n) < TOL[torch.float32] and x.grad is not None and w.grad is not None
    out, n_op, mean, rstd = torch.ops.metazoo.norm_residual_fwd(x.detach(), None, None, None, w.detach(), None,
                                                                1e-6, False, torch.float32, torch.float32)
    assert out.numel() == 0 and mean.shape == (15,) and rel_err(n_op, ref_n) < TOL[torch.float32]


def test_backend_torch_is_the_reference():
    x = _rand(2, 5, 7)
    w = _rand(7)
    assert torch.equal(norm_residual(x, weight=w, backend="torch")[1], norm_residual_ref(x, weight=w)[1])
    with dispatch.use_backend("torch"):
        s, b = _rand(1), _rand(1)
        assert torch.equal(star_relu(x, s, b), star_relu_ref(x, s, b))


def test_bad_inputs_raise_value_error():
    x = _rand(1, 4, 5, 5)
    with pytest.raises(ValueError, match="weight"):
        dwconv2d(x, _rand(3, 1, 3, 3), backend="torch")
    with pytest.raises(ValueError, match="act_scale"):
        dwconv2d(x, _rand(4, 1, 3, 3), act_scale=_rand(1), backend="torch")
    with pytest.raises(ValueError, match="scale"):
        star_relu(x, _rand(2), _rand(1), backend="torch")
    with pytest.raises(ValueError, match="neither"):
        norm_residual(x, backend="torch")
    with pytest.raises(ValueError, match="hidden"):
        gated_dwconv(_rand(1, 3, 3, 10), _rand(2, 1, 3, 3), None, hidden=4, backend="torch")
    with pytest.raises(ValueError, match="pool_size"):
        pool_mixer(x, _rand(4), pool_size=2, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        star_relu(x, _rand(1), _rand(1), backend="cuda")
    with pytest.raises(ValueError, match="act="):
        act_linear(x, _rand(3, 4), act="relu", backend="torch")
    with pytest.raises(ValueError, match="fc_weight"):
        act_linear(x, _rand(3, 4), backend="torch")


def test_custom_ops_trace_without_graph_breaks():
    """torch.compile(fullgraph=True) traces through every op and its backward (fake impls, autograd)."""
    x = _rand(1, 6, 4, 3, shift=1.0).requires_grad_()
    w = _rand(6).requires_grad_()
    wk = (_rand(6, 1, 3, 3) / 3).requires_grad_()
    s, b = _rand(1).requires_grad_(), _rand(1).requires_grad_()
    u = _rand(1, 3, 4, 2 * 8).requires_grad_()
    wg = (_rand(5, 1, 3, 3) / 3).requires_grad_()
    fw = _rand(7, 8).requires_grad_()

    def step(x, w, wk, s, b, u, wg, fw):
        out, mom = pool_mixer(x, w, None, 1e-5, w, None, backend="triton")
        n = group_norm1(out, w, None, 1e-6, moments=mom, backend="triton")
        h = dwconv2d(n, wk, None, s, b, backend="triton")
        h = star_relu(h, s, b, backend="triton")
        r, n2 = norm_residual(out, h, w, w, w, None, 1e-6, channels_first=True, backend="triton")
        return ((n2 * r).sum() + gated_dwconv(u, wg, None, 8, backend="triton").sum()
                + gated_dwconv_linear(u, wg, None, 8, fw, fw[:, 0], backend="triton").sum()
                + act_linear(h, fw[:6, :6, None, None], None, "star_relu", s, b, True, backend="triton").sum())

    args = (x, w, wk, s, b, u, wg, fw)
    eager = torch.autograd.grad(step(*args), args)
    compiled_fn = torch.compile(step, fullgraph=True, backend="aot_eager")
    traced = torch.autograd.grad(compiled_fn(*args), args)
    for e, t in zip(eager, traced):
        assert rel_err(t, e) < 1e-5


def test_backward_op_is_direct_in_eager_and_registered_when_traced():
    """Eager backward passes call a kernel's backward implementation directly (no torch.library
    dispatch cost); fake-tensor tracing still goes through the registered op and its fake impl."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from metazoo.kernels._autograd import BackwardOp

    calls = []

    def impl(g: torch.Tensor, k: int) -> torch.Tensor:
        calls.append(type(g).__name__)
        return g * k

    op = BackwardOp("metazoo_test::scale_bwd", impl)
    op.register_fake(lambda g, k: torch.empty_like(g))
    assert torch.equal(op(torch.ones(3), 2), torch.full((3,), 2.0)) and calls == ["Tensor"]
    with FakeTensorMode():
        out = op(torch.ones(3), 2)
    assert calls == ["Tensor"] and tuple(out.shape) == (3,)



def _contract_cases():
    """Every public dispatcher of metazoo.kernels: (dispatcher, reference, op name, inputs maker)."""
    from metazoo.kernels.aff_filter import aff_filter, aff_filter_ref
    from metazoo.kernels.aggregated_attention import aggregated_attention, aggregated_attention_ref
    from metazoo.kernels.norm_residual import layer_norm, layer_norm_ref, scale_add, scale_add_ref
    from metazoo.kernels.selective_scan import selective_scan, selective_scan_ref

    def leaf(*shape, scale=1.0, shift=0.0):
        return _rand(*shape, scale=scale, shift=shift).requires_grad_()

    def scan():
        return (leaf(1, 4, 6), leaf(1, 4, 6, scale=0.5), (-torch.rand(4, 2) - 0.5).requires_grad_(), leaf(1, 2, 6),
                leaf(1, 2, 6), leaf(4), None, True)

    def aff():
        return leaf(1, 8, 3, 2, 2), leaf(2, 2, 4, 4, scale=0.3), leaf(2, 2, 4), leaf(2, 2, 4, 4, scale=0.3), leaf(2, 2, 4)

    def attention():
        return (leaf(1, 9, 8), leaf(1, 9, 16), leaf(1, 4, 16), leaf(2, 4), leaf(2), leaf(2, 9), leaf(2, 9, 4),
                leaf(2, 4, 9), leaf(2, 9), 3, 3, 2, 3)

    return {
        "star_relu": (star_relu, star_relu_ref, "star_relu", lambda: (leaf(2, 3, 5), leaf(1), leaf(1))),
        "act_linear": (act_linear, act_linear_ref, "act_linear",
                       lambda: (leaf(2, 3, 8), leaf(6, 8), leaf(6), "star_relu", leaf(1), leaf(1))),
        "dwconv2d": (dwconv2d, dwconv2d_ref, "dwconv", lambda: (leaf(1, 6, 4, 5), leaf(6, 1, 3, 3), leaf(6))),
        "gated_dwconv": (gated_dwconv, gated_dwconv_ref, "gated_dwconv",
                         lambda: (leaf(1, 3, 4, 16), leaf(5, 1, 3, 3), leaf(5), 8)),
        "gated_dwconv_linear": (gated_dwconv_linear, gated_dwconv_linear_ref, "gated_dwconv_linear",
                                lambda: (leaf(1, 3, 4, 16), leaf(5, 1, 3, 3), None, 8, leaf(7, 8), leaf(7))),
        "group_norm1": (group_norm1, group_norm1_ref, "group_norm1", lambda: (leaf(2, 6, 4, 3), leaf(6), leaf(6))),
        "norm_residual": (norm_residual, norm_residual_ref, "norm_residual",
                          lambda: (leaf(2, 5, 8), leaf(2, 5, 8), leaf(8), leaf(8), leaf(8), leaf(8))),
        "layer_norm": (layer_norm, layer_norm_ref, "norm_residual", lambda: (leaf(2, 5, 8), leaf(8), leaf(8))),
        "norm_linear": (norm_linear, norm_linear_ref, "norm_linear",
                        lambda: (leaf(2, 5, 8), leaf(8), leaf(8), 1e-6, leaf(6, 8), leaf(6))),
        "scale_add": (scale_add, scale_add_ref, "norm_residual", lambda: (leaf(2, 5, 8), leaf(2, 5, 8), leaf(8), None)),
        "pool_mixer": (pool_mixer, pool_mixer_ref, "pool_mixer",
                       lambda: (leaf(1, 6, 4, 3), leaf(6), leaf(6), 1e-5, leaf(6), leaf(6))),
        "selective_scan": (selective_scan, selective_scan_ref, "selective_scan", scan),
        "aff_filter": (aff_filter, aff_filter_ref, "aff_filter", aff),
        "aggregated_attention": (aggregated_attention, aggregated_attention_ref, "aggregated_attention", attention),
    }


DISPATCHERS = sorted(_contract_cases())


def _loss(out):
    """Sum of every floating tensor in a dispatcher's (possibly nested) result."""
    flat = torch.utils._pytree.tree_leaves(out)
    return sum(o.float().sum() for o in flat if torch.is_tensor(o) and o.is_floating_point())


def _kernel_ops():
    """Every ForwardOp / BackwardOp instance of the kernel modules, with the module holding it."""
    import importlib
    import pkgutil

    import metazoo.kernels as kernels
    from metazoo.kernels._autograd import BackwardOp, ForwardOp

    for info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"metazoo.kernels.{info.name}")
        for name, value in vars(mod).items():
            if isinstance(value, (ForwardOp, BackwardOp)):
                yield value


@pytest.mark.parametrize("name", DISPATCHERS)
def test_eager_call_runs_the_autograd_function_without_the_op(name, monkeypatch):
    """Eager forward and backward run the kernels through the autograd.Function and direct backward
    calls, never through torch.library dispatch (which costs host time on every call)."""
    fn, ref, _, make = _contract_cases()[name]

    def refuse(*args, **kwargs):
        raise AssertionError("an eager call entered a registered op")

    for op in _kernel_ops():
        monkeypatch.setattr(op, "op", refuse)
    args = make()
    out = fn(*args, backend="triton")
    first = torch.utils._pytree.tree_leaves(out)[0]
    assert type(first.grad_fn).__name__ == "_EagerBackward", type(first.grad_fn).__name__
    leaves = [a for a in args if torch.is_tensor(a)]
    grads = torch.autograd.grad(_loss(out), leaves, allow_unused=True)
    assert grads[0] is not None and torch.isfinite(grads[0]).all(), name


@pytest.mark.parametrize("name", DISPATCHERS)
def test_compiled_call_sees_the_registered_op(name):
    """torch.compile(fullgraph=True) traces the registered forward op and, in the backward graph,
    the registered backward op (fake impls and autograd registered), with the eager values."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    fn, _, op, make = _contract_cases()[name]
    torch._dynamo.reset()  # one lambda's code object serves every case: stay under the recompile limit
    graphs = {}

    def capture(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            return make_boxed_func(gm.forward)
        return compiler

    args = make()
    leaves = [a for a in args if torch.is_tensor(a)]
    eager = torch.autograd.grad(_loss(fn(*args, backend="triton")), leaves)
    compiled = torch.compile(lambda *a: _loss(fn(*a, backend="triton")), fullgraph=True,
                             backend=aot_autograd(fw_compiler=capture("fw"), bw_compiler=capture("bw")))
    traced = torch.autograd.grad(compiled(*args), leaves)
    assert f"metazoo.{op}_fwd.default" in graphs["fw"], sorted(graphs["fw"])
    assert f"metazoo.{op}_bwd.default" in graphs["bw"], sorted(graphs["bw"])
    for e, t in zip(eager, traced):
        assert rel_err(t, e) < 1e-5


@pytest.mark.parametrize("name", DISPATCHERS)
def test_fx_symbolic_trace_reaching_a_dispatcher_names_the_missing_branch(name):
    """Callers branch to plain PyTorch under FX symbolic tracing (``plain_pytorch``); a call that
    reaches a dispatcher with a proxy raises, naming that branch."""
    fn, _, _, make = _contract_cases()[name]
    args = [a.detach() if torch.is_tensor(a) else a for a in make()]

    class Caller(torch.nn.Module):
        def forward(self, x):
            return fn(x, *args[1:], backend="triton")

    with pytest.raises(RuntimeError, match="plain_pytorch"):
        torch.fx.symbolic_trace(Caller())


def test_torchscript_compiles_callers_of_the_dispatchers():
    """Scripting a module that calls a dispatcher compiles (the dispatcher is ``torch.jit.unused``);
    its ``torch.jit.is_scripting()`` branch computes the result in plain PyTorch."""
    for name in DISPATCHERS:
        assert torch._jit_internal.is_ignored_fn(_contract_cases()[name][0]), name

    class Caller(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(_rand(8))

        def forward(self, x, y):
            if torch.jit.is_scripting():
                return x + y
            out, n = norm_residual(x, y, None, None, self.w)
            return star_relu(out, self.w[:1], self.w[1:2]) + (n if n is not None else out)

    x, y = _rand(2, 8), _rand(2, 8)
    scripted = torch.jit.script(Caller())
    assert torch.equal(scripted(x, y), x + y)


def _blocks(drop_path: float = 0.0):
    from torch import nn

    from metazoo.backbones.metaformer import MetaFormerBlock
    from metazoo.layers.activations import StarReLU
    from metazoo.mixers.attention import Attention
    from metazoo.mixers.gated_cnn import GatedCNNBlock
    from metazoo.layers.norms import GroupNorm1, group_norm1_no_bias, layer_norm2d_no_bias, layer_norm_no_bias
    from metazoo.mixers.pooling import Pooling
    from metazoo.mixers.affine import Affine
    from metazoo.mixers.identity import IdentityMixer
    from metazoo.mixers.random_mixing import RandomMixing
    from metazoo.mixers.sepconv import SepConv

    return {
        "poolformer_v1": (MetaFormerBlock(12, Pooling, norm_layer=GroupNorm1, mlp_act=nn.GELU, mlp_bias=True,
                                          layer_scale_init_value=1e-5, drop_path=drop_path), (2, 12, 5, 6)),
        "poolformer_v2": (MetaFormerBlock(12, Pooling, norm_layer=group_norm1_no_bias, mlp_act=StarReLU,
                                          res_scale_init_value=1.0, drop_path=drop_path), (1, 12, 4, 7)),
        "convformer": (MetaFormerBlock(8, SepConv, norm_layer=layer_norm2d_no_bias, mlp_act=StarReLU,
                                       res_scale_init_value=1.0, drop_path=drop_path), (1, 8, 4, 5)),
        "caformer_attention": (MetaFormerBlock(32, Attention, norm_layer=layer_norm_no_bias, mlp_act=StarReLU,
                                               res_scale_init_value=1.0, layout="NLC", drop_path=drop_path),
                               (2, 9, 32)),
        "mambaout": (GatedCNNBlock(12, ls_init_value=1.0 if drop_path else None, drop_path=drop_path),
                     (1, 4, 5, 12)),
        "riformer": (MetaFormerBlock(12, Affine, norm_layer=GroupNorm1, mlp_act=nn.GELU, mlp_bias=True,
                                     layer_scale_init_value=1e-5, drop_path=drop_path), (2, 12, 5, 6)),
        "riformer_deploy": (MetaFormerBlock(12, IdentityMixer, norm_layer=GroupNorm1, mlp_act=nn.GELU, mlp_bias=True,
                                            layer_scale_init_value=1e-5, drop_path=drop_path), (2, 12, 5, 6)),
        "identityformer": (MetaFormerBlock(12, IdentityMixer, norm_layer=group_norm1_no_bias, mlp_act=StarReLU,
                                           res_scale_init_value=1.0, drop_path=drop_path), (1, 12, 4, 7)),
        "randformer": (MetaFormerBlock(12, partial(RandomMixing, num_tokens=16), norm_layer=group_norm1_no_bias,
                                       mlp_act=StarReLU, res_scale_init_value=1.0, drop_path=drop_path), (1, 12, 4, 4)),
    }


BLOCKS = ["poolformer_v1", "poolformer_v2", "convformer", "caformer_attention", "mambaout", "riformer",
          "riformer_deploy", "identityformer", "randformer"]


@pytest.mark.parametrize("family", BLOCKS)
def test_block_kernels_on_equals_off(family):
    """A whole block (the wiring of the kernels into mixers and the fused residual/norm path):
    output and every parameter gradient with Triton kernels equal the plain PyTorch path."""
    block, shape = _blocks()[family]
    with torch.no_grad():
        for p in block.parameters():  # non-trivial scales/norm affines so every term matters
            p.copy_(torch.randn_like(p) * 0.5)
    x = _rand(*shape)
    res = {}
    for backend in ("triton", "torch"):
        block.zero_grad()
        xi = x.clone().requires_grad_()
        with dispatch.use_backend(backend):
            y = block(xi)
            (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        res[backend] = [y, xi.grad] + [p.grad for p in block.parameters()]
    names = ["out", "d_x"] + [n for n, _ in block.named_parameters()]
    zero = 1e-5 * res["torch"][1].norm()
    for name, k, r in zip(names, res["triton"], res["torch"]):
        assert k is not None and r is not None, name
        if r.norm() < zero:  # PoolFormer's norm1 bias cancels in pool(n) - n: zero up to rounding
            assert k.norm() < zero, name
            continue
        assert rel_err(k, r) < 2e-5, f"{family}: {name} differs by {rel_err(k, r):.2e}"


def test_norm_for_matmul_writes_autocasts_matmul_dtype():
    """A LayerNorm feeding a matmul is written in autocast's dtype: the bits of the plain norm's result
    cast by autocast (to one bf16 step: the fp32 sums may round differently); otherwise plain."""
    from metazoo.layers.norms import LayerNorm2d, GroupNorm1, norm_for_matmul

    x = _rand(2, 8, 3, 5, scale=2.0, shift=0.5)
    ln, gn = LayerNorm2d(8), GroupNorm1(8)
    with torch.no_grad():
        ln.weight.copy_(_rand(8)), ln.bias.copy_(_rand(8))
    with dispatch.use_backend("triton"), torch.autocast(DEVICE, dtype=torch.bfloat16):
        n = norm_for_matmul(ln, x)
        assert n.dtype == torch.bfloat16 and norm_for_matmul(gn, x).dtype == gn(x).dtype
    with dispatch.use_backend("torch"):
        want = ln(x).to(torch.bfloat16)
    ulp = want.float().abs().clamp_min(1e-3) * 2 ** -7
    assert ((n.float() - want.float()).abs() <= ulp).all()
    with dispatch.use_backend("triton"):
        assert norm_for_matmul(ln, x).dtype == torch.float32  # no autocast: the norm's own dtype


@pytest.mark.parametrize("family", BLOCKS)
def test_block_under_autocast_matches_the_plain_paths_dtypes_and_error(family):
    """Under bf16 autocast a block with kernels returns the plain path's dtypes (output, input
    gradient), and its bf16 error against the plain fp32 block is within the plain bf16 path's own."""
    block, shape = _blocks()[family]
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = _rand(*shape)
    w = torch.linspace(-1, 1, x.numel(), device=DEVICE).view(shape)
    res = {}
    for tag, backend, amp in (("fp32", "torch", False), ("plain", "torch", True), ("kernels", "triton", True)):
        block.zero_grad()
        xi = x.detach().to(torch.bfloat16 if amp else x.dtype, copy=True).requires_grad_()
        with dispatch.use_backend(backend), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=amp):
            y = block(xi)
        (y.float() * w).sum().backward()
        res[tag] = (y, xi.grad, torch.cat([p.grad.flatten() for p in block.parameters()]))
    assert [t.dtype for t in res["kernels"][:2]] == [t.dtype for t in res["plain"][:2]], family
    for i, name in enumerate(("out", "d_x", "param grads")):
        err, bar = (rel_err(res[tag][i].float(), res["fp32"][i]) for tag in ("kernels", "plain"))
        assert err <= 1.25 * bar + 1e-4, f"{family} {name}: bf16 error {err:.2e}, plain bf16 path {bar:.2e}"


@pytest.mark.parametrize("family", ["poolformer_v1", "poolformer_v2", "convformer", "caformer_attention", "mambaout",
                                    "riformer", "identityformer", "randformer"])
def test_block_with_drop_path_kernels_on_equals_off_and_plain(family):
    """Training with drop path takes the fused path: with the masks seeded identically, Triton kernels,
    their references and (MetaFormer blocks) the plain unfused path give the same output and gradients."""
    block, shape = _blocks(drop_path=0.5)[family]
    block.train()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = _rand(4, *shape[1:])
    cot = torch.linspace(-1, 1, x.numel()).view(x.shape)

    def run(backend, fused=True):
        block.zero_grad()
        if not fused:
            block.unfuse()
        xi = x.clone().requires_grad_()
        torch.manual_seed(7)
        with dispatch.use_backend(backend):
            y = block(xi)
            (y * cot).sum().backward()
        return [y, xi.grad] + [p.grad for p in block.parameters()]

    saved = {"fused_op": block.fused_op} if hasattr(block, "fused_op") else {}
    res = {"triton": run("triton"), "torch": run("torch")}
    if saved:
        res["plain"] = run("torch", fused=False)
        block.__dict__.update(saved)
    names = ["out", "d_x"] + [n for n, _ in block.named_parameters()]
    with torch.no_grad(), dispatch.use_backend("torch"):
        assert not torch.allclose(block.eval()(x), res["torch"][0]), "seed 7 dropped no branch"
    zero = 1e-5 * res["torch"][1].norm()
    for other in [k for k in res if k != "torch"]:
        for name, k, r in zip(names, res[other], res["torch"]):
            assert k is not None and r is not None, name
            if r.norm() < zero:
                assert k.norm() < zero, name
                continue
            assert rel_err(k, r) < 1e-5, f"{family} ({other}): {name} differs by {rel_err(k, r):.2e}"


# RandFormer's mixer picks its matrix by the token grid (Python control flow on sizes): not FX-traceable
@pytest.mark.parametrize("family", [f for f in BLOCKS if f != "randformer"])
def test_block_traces_to_plain_pytorch_under_fx(family):
    """FX symbolic tracing takes every call site's plain branch (``plain_pytorch``): the graph calls no
    kernel dispatcher and computes the block's output."""
    block, shape = _blocks()[family]
    block.eval()
    x = _rand(*shape)
    gm = torch.fx.symbolic_trace(block)
    dispatchers = {case[0] for case in _contract_cases().values()}
    called = [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target in dispatchers]
    assert not called, called
    with torch.no_grad(), dispatch.use_backend("torch"):
        assert rel_err(gm(x), block(x)) < 1e-6


def test_compile_ops_table_names_the_dispatchers():
    """Every ``COMPILE_OPS`` key is a kernel dispatcher, and every default entry keeps the custom op
    until a GPU measurement justifies another."""
    assert set(dispatch.COMPILE_OPS) <= set(DISPATCHERS), sorted(set(dispatch.COMPILE_OPS) - set(DISPATCHERS))
    assert set(dispatch.COMPILE_OPS.values()) <= {"custom", "inductor"}


def _compiled_ops(block, x, policy, seed=0):
    """(metazoo ops in the forward graph torch.compile traces, output, input gradient) under ``policy``;
    ``seed`` seeds the run's drop path masks."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    ops = set()

    def capture(gm, example_inputs):
        ops.update(str(n.target) for n in gm.graph.nodes if str(n.target).startswith("metazoo."))
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()  # a compiled graph keeps the policy it was traced with
    xi = x.clone().requires_grad_()
    with dispatch.compile_ops(policy), dispatch.use_backend("triton"):
        torch.manual_seed(seed)
        y = torch.compile(block, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture))(xi)
        y.sum().backward()
    torch._dynamo.reset()
    return {o.split(".")[1] for o in ops}, y.detach(), xi.grad


def _eval_block_reference(family):
    """(block in eval mode, input, plain-PyTorch output, input gradient of its sum) for ``family``."""
    block, shape = _blocks()[family]
    block.eval()
    x = _rand(*shape)
    xe = x.clone().requires_grad_()
    with dispatch.use_backend("torch"):
        want = block(xe)
        want.sum().backward()
    return block, x, want, xe.grad


def test_compile_policy_picks_the_path_per_op(monkeypatch):
    """Under torch.compile ``custom`` keeps the kernels' ops, ``inductor`` gives inductor plain PyTorch
    only, and the table decides per op (here: the depthwise conv to inductor, the rest custom); every
    policy computes the eager values."""
    block, x, want, want_grad = _eval_block_reference("convformer")
    custom, y_c, g_c = _compiled_ops(block, x, "custom")
    assert {"norm_residual_fwd", "dwconv_fwd", "act_linear_fwd"} <= custom, custom
    inductor, y_i, g_i = _compiled_ops(block, x, "inductor")
    assert inductor == set(), inductor
    for op in dispatch.COMPILE_OPS:  # a table independent of the measured one
        monkeypatch.setitem(dispatch.COMPILE_OPS, op, "inductor" if op == "dwconv2d" else "custom")
    table, y_t, g_t = _compiled_ops(block, x, "table")
    assert "dwconv_fwd" not in table and {"norm_residual_fwd", "act_linear_fwd"} <= table, table
    for y, g in ((y_c, g_c), (y_i, g_i), (y_t, g_t)):
        assert rel_err(y, want) < 1e-5 and rel_err(g, want_grad) < 1e-5


def test_gated_block_residual_follows_its_lead_op_under_compile(monkeypatch):
    """MambaOut's block: with the gated conv given to inductor its residual is too (no custom scale_add in
    the traced graph), with the gated conv custom the residual keeps its kernel; values as eager."""
    block, x, want, want_grad = _eval_block_reference("mambaout")
    monkeypatch.setitem(dispatch.COMPILE_OPS, "scale_add", "custom")
    both = {f"{op}_{p}" for op in ("gated_dwconv_linear", "norm_residual") for p in ("fwd", "bwd")}
    for lead, expect in (("inductor", set()), ("custom", both)):
        monkeypatch.setitem(dispatch.COMPILE_OPS, "gated_dwconv_linear", lead)
        ops, y, g = _compiled_ops(block, x, "table")  # scale_add runs as the norm_residual op
        assert ops == expect, (lead, ops)
        assert rel_err(y, want) < 1e-5 and rel_err(g, want_grad) < 1e-5


@pytest.mark.parametrize("family", ["poolformer_v2", "mambaout"])
def test_compile_policies_draw_drop_path_masks_as_eager(family):
    """Training with drop path under torch.compile: the custom ops' keep vector and the plain path's
    DropPath draw the same masks as an eager run seeded alike (values and input gradients equal)."""
    block, shape = _blocks(drop_path=0.5)[family]
    block.train()
    x = _rand(4, *shape[1:])
    xe = x.clone().requires_grad_()
    torch.manual_seed(7)
    with dispatch.use_backend("torch"):
        want = block(xe)
        want.sum().backward()
    with torch.no_grad(), dispatch.use_backend("torch"):
        assert not torch.allclose(block.eval()(x), want), "seed 7 dropped no branch"
    block.train()
    for policy in ("custom", "inductor"):
        _, y, g = _compiled_ops(block, x, policy, seed=7)
        assert rel_err(y, want) < 1e-5 and rel_err(g, xe.grad) < 1e-5, policy


def test_table_gives_every_op_to_inductor_without_cuda_graphs(monkeypatch):
    """The table applies where inductor replays CUDA graphs (mode reduce-overhead, or the option);
    default-mode inductor gets every op's plain path; other backends, the context and the environment
    variable keep their choice."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    monkeypatch.setitem(dispatch.COMPILE_OPS, "scale_add", "custom")
    monkeypatch.delenv(dispatch.COMPILE_ENV_VAR, raising=False)

    def f(x):
        return x + 1 if dispatch.plain_pytorch("scale_add") else x - 1

    def run(policy=None, **kw):
        torch._dynamo.reset()
        with dispatch.compile_ops(policy) if policy else contextlib.nullcontext():
            out = torch.compile(f, **kw)(torch.zeros(3))
        torch._dynamo.reset()
        return "inductor" if out[0] == 1 else "custom"

    assert dispatch.graphed_compile() is None  # not tracing
    assert run() == "inductor"
    assert run(mode="reduce-overhead") == "custom"
    assert run(options={"triton.cudagraphs": True}) == "custom"
    assert run(backend=aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward))) == "custom"  # the table
    assert run("custom") == "custom" and run("inductor", mode="reduce-overhead") == "inductor"
    monkeypatch.setenv(dispatch.COMPILE_ENV_VAR, "custom")
    assert run() == "custom"
    monkeypatch.delenv(dispatch.COMPILE_ENV_VAR)
    assert all(dispatch.COMPILE_OPS[op] == "custom" for op in dispatch.TABLE_IN_EVERY_MODE)
    monkeypatch.setattr(dispatch, "TABLE_IN_EVERY_MODE", frozenset({"scale_add"}))
    assert run() == "custom"  # a plain path no fit for inductor keeps the table's choice in every mode


def test_compile_policy_precedence_and_bad_values(monkeypatch):
    """Context over ``METAZOO_COMPILE_OPS`` over the table; unknown policies and ops raise ValueError
    naming the argument and the accepted values."""
    monkeypatch.setitem(dispatch.COMPILE_OPS, "star_relu", "inductor")
    monkeypatch.setitem(dispatch.COMPILE_OPS, "dwconv2d", "custom")
    monkeypatch.delenv(dispatch.COMPILE_ENV_VAR, raising=False)
    assert dispatch.compile_policy("star_relu") == "inductor" and dispatch.compile_policy("dwconv2d") == "custom"
    monkeypatch.setenv(dispatch.COMPILE_ENV_VAR, "custom")
    assert dispatch.compile_policy("star_relu") == "custom"
    with dispatch.compile_ops("inductor"):
        assert dispatch.compile_policy("dwconv2d") == "inductor"
    assert not dispatch.plain_pytorch("star_relu")  # eager: the dispatcher decides
    monkeypatch.setenv(dispatch.COMPILE_ENV_VAR, "fused")
    with pytest.raises(ValueError, match="METAZOO_COMPILE_OPS='fused'.*custom, inductor, table"):
        dispatch.compile_policy("star_relu")
    with pytest.raises(ValueError, match="policy='all'"):
        with dispatch.compile_ops("all"):
            pass
    with pytest.raises(ValueError, match="op='starrelu'.*star_relu"):
        dispatch.plain_pytorch("starrelu")


@pytest.mark.slow
def test_model_kernels_on_equals_off():
    """End to end: CAFormer-S18 (conv and attention stages, every LayerNorm kind, StarReLU, SepConv)."""
    import timm

    import metazoo  # noqa: F401

    model = timm.create_model("mz_caformer_s18").eval()
    x = _rand(1, 3, 32, 32)
    with torch.no_grad():
        with dispatch.use_backend("triton"):
            y_k = model(x)
        with dispatch.use_backend("torch"):
            y_r = model(x)
    assert rel_err(y_k, y_r) < 1e-5


@pytest.mark.parametrize("interleaved", [False, True])
def test_finish_moments_reduces_many_partials(interleaved):
    """Moments from partial sums (more partials than one block, both layouts the kernels write)
    equal the float64 moments of the values they summarize."""
    from metazoo.kernels.group_norm import finish_moments

    B, n, per = 3, 2500, 7
    v = torch.randn(B, n, per, dtype=torch.float64) * 2 + 5
    pivot = v[:, 0, 0].float()
    d = v - pivot.double()[:, None, None]
    s1, s2 = d.sum(-1), (d * d).sum(-1)
    parts = (torch.stack([s1, s2], -1) if interleaved else torch.stack([s1, s2], 1)).float().contiguous()
    layout = (2 * n, 2, 1) if interleaved else (2 * n, 1, n)
    mean, var, rstd = finish_moments(parts, B, n, *layout, pivot, 1, n * per, eps=1e-5)
    ref_var, ref_mean = torch.var_mean(v.reshape(B, -1), dim=1, unbiased=False)
    assert rel_err(mean, ref_mean) < 1e-6 and rel_err(var, ref_var) < 1e-5
    assert rel_err(rstd, (ref_var + 1e-5).rsqrt()) < 1e-5
