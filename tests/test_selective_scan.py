"""Selective-scan kernel vs its sequential reference: forward and every gradient, fp32 and bf16."""
import random

import pytest
import torch

from metazoo.kernels import use_backend
from metazoo.kernels.selective_scan import (_fwd, _launch_cfg, selective_scan, selective_scan_chunked,
                                           selective_scan_ref)

CHUNK = _launch_cfg(4, 4)[2]  # the chunk the interpreter runs with (16)
TOL = {torch.float32: 5e-5, torch.bfloat16: 2e-2}


def _shapes(count=20, seed=1234):
    """Random small shapes; most lengths are not multiples of the chunk, a few are."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        groups = rng.choice([1, 1, 2, 4])
        dim = groups * rng.choice([1, 2, 3, 6, 9])  # 6, 9: several channel blocks per group (atomic dB/dC)
        seqlen = CHUNK * rng.randint(1, 2) if i % 5 == 4 else rng.randint(2, 2 * CHUNK + 9)
        if i % 5 != 4 and seqlen % CHUNK == 0:
            seqlen += 1
        out.append(dict(bsz=rng.randint(1, 2), dim=dim, seqlen=seqlen, n=rng.choice([1, 2, 3, 4, 5]),
                        groups=groups, softplus=rng.random() < 0.6, has_d=rng.random() < 0.7,
                        has_bias=rng.random() < 0.5))
    return out


def _inputs(s, dtype, gen):
    """Random inputs in the ranges a trained S6 block sees (Δ from softplus or small positive)."""
    bsz, dim, seqlen, n, groups = s["bsz"], s["dim"], s["seqlen"], s["n"], s["groups"]
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    u = r(bsz, dim, seqlen).to(dtype)
    delta = (r(bsz, dim, seqlen) - 1.0) if s["softplus"] else torch.rand(bsz, dim, seqlen, generator=gen) * 0.5
    A = -torch.exp(r(dim, n) * 0.5 + 0.5)
    B = r(bsz, groups, n, seqlen).to(dtype)
    C = r(bsz, groups, n, seqlen).to(dtype)
    D = r(dim) if s["has_d"] else None
    bias = r(dim) * 0.5 if s["has_bias"] else None
    return [u, delta.to(dtype), A, B, C, D, bias]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("idx", range(20))
def test_kernel_matches_reference(idx, dtype):
    s = _shapes()[idx]
    gen = torch.Generator().manual_seed(idx + (100 if dtype == torch.bfloat16 else 0))
    xs = [t.requires_grad_() if t is not None else None for t in _inputs(s, dtype, gen)]
    # B/C of one group passed as (batch, N, L) exercises the 3-D form
    if s["groups"] == 1:
        xs[3] = xs[3].detach()[:, 0].requires_grad_()
        xs[4] = xs[4].detach()[:, 0].requires_grad_()
    y = selective_scan(*xs, delta_softplus=s["softplus"], backend="triton")
    assert y.dtype == dtype and y.shape == xs[0].shape
    gy = torch.randn(y.shape, generator=gen).to(dtype)
    live = [t for t in xs if t is not None]
    grads = torch.autograd.grad(y, live, gy)

    ref_in = [t.detach().double().requires_grad_() if t is not None else None for t in xs]
    y_ref = selective_scan_ref(*ref_in, delta_softplus=s["softplus"])
    ref_grads = torch.autograd.grad(y_ref, [t for t in ref_in if t is not None], gy.double())

    tol = TOL[dtype]
    assert torch.isfinite(y).all()
    assert _rel(y, y_ref) < tol, f"forward {s}"
    names = [n for n, t in zip(["u", "delta", "A", "B", "C", "D", "delta_bias"], xs) if t is not None]
    for name, g, gr, x in zip(names, grads, ref_grads, live):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert _rel(g, gr) < tol, f"grad {name} {s}: {_rel(g, gr):.2e}"


def test_reference_is_the_plain_recurrence():
    """The reference equals a hand-written ZOH recurrence at one channel/state (no shared code)."""
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(1, 1, 7, generator=gen, dtype=torch.float64)
    dt = torch.rand(1, 1, 7, generator=gen, dtype=torch.float64) + 0.1
    A = torch.tensor([[-0.7]], dtype=torch.float64)
    B = torch.randn(1, 1, 7, generator=gen, dtype=torch.float64)
    C = torch.randn(1, 1, 7, generator=gen, dtype=torch.float64)
    h, ys = 0.0, []
    for t in range(7):
        a = torch.exp(dt[0, 0, t] * A[0, 0])
        h = a * h + (a - 1) / A[0, 0] * B[0, 0, t] * u[0, 0, t]  # (ΔA)^-1 (e^{ΔA} - 1) ΔB u
        ys.append(h * C[0, 0, t] + 0.5 * u[0, 0, t])
    want = torch.stack(ys)
    got = selective_scan_ref(u, dt, A, B, C, D=torch.tensor([0.5], dtype=torch.float64))[0, 0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_dispatch_and_noncontiguous_inputs():
    """'torch' and the context manager route to the reference; strided inputs give the same result."""
    gen = torch.Generator().manual_seed(3)
    s = dict(bsz=2, dim=4, seqlen=CHUNK + 3, n=3, groups=2, softplus=True, has_d=True, has_bias=True)
    u, delta, A, B, C, D, bias = _inputs(s, torch.float32, gen)
    ref = selective_scan_ref(u, delta, A, B, C, D, bias, True)
    torch.testing.assert_close(selective_scan(u, delta, A, B, C, D, bias, True, backend="torch"), ref)
    with use_backend("torch"):
        torch.testing.assert_close(selective_scan(u, delta, A, B, C, D, bias, True), ref)
    u_t = u.transpose(1, 2).contiguous().transpose(1, 2)  # same values, L not innermost
    B_t = B.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    out = selective_scan(u_t, delta, A, B_t, C, D, bias, True, backend="triton")
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("idx", range(0, 20, 3))
def test_chunked_matches_sequential(idx):
    """The chunked scan (CPU / TorchScript / export path) against the sequential oracle, fp32, forward
    and every gradient, on lengths that are not multiples of the chunk (8 here, so several chunks)."""
    s = _shapes()[idx]
    xs = [t.requires_grad_() if t is not None else None for t in _inputs(s, torch.float32, torch.Generator().manual_seed(idx))]
    y_ref = selective_scan_ref(*xs, delta_softplus=s["softplus"])
    y = selective_scan_chunked(*xs, delta_softplus=s["softplus"], chunk=8)
    assert _rel(y, y_ref) < 1e-5
    leaves = [t for t in xs if t is not None]
    g = torch.randn_like(y_ref)
    for got, want in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(y_ref, leaves, g)):
        assert _rel(got, want) < 1e-5


def test_chunked_scan_scripts():
    """TorchScript compiles the chunked scan (the scripted ViM2 runs it) and agrees with eager."""
    s = _shapes()[1]
    xs = _inputs(s, torch.float32, torch.Generator().manual_seed(5))
    scripted = torch.jit.script(selective_scan_chunked)
    torch.testing.assert_close(scripted(*xs, delta_softplus=s["softplus"]),
                               selective_scan_chunked(*xs, delta_softplus=s["softplus"]))


def test_bad_inputs_raise():
    u = torch.randn(1, 4, 5)
    A = -torch.ones(4, 2)
    B = torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match="delta"):
        selective_scan(u, u[:, :, :4], A, B, B)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(u, u, A[:3], B, B)
    with pytest.raises(ValueError, match="divisible by G"):
        selective_scan(u, u, A, torch.randn(1, 3, 2, 5), torch.randn(1, 3, 2, 5))
    with pytest.raises(ValueError, match="D must be"):
        selective_scan(u, u, A, B, B, D=torch.ones(3))
    with pytest.raises(ValueError, match="backend"):
        selective_scan(u, u, A, B, B, backend="cuda")


def test_custom_op_registration():
    """The torch.library forward op passes opcheck (schema, fake tensor, dispatch)."""
    gen = torch.Generator().manual_seed(5)
    s = dict(bsz=1, dim=2, seqlen=5, n=2, groups=1, softplus=True, has_d=True, has_bias=False)
    u, delta, A, B, C, D, _ = _inputs(s, torch.float32, gen)
    torch.library.opcheck(_fwd.op, (u, delta, A, B, C, D, None, True, True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("length", [1, 2, 7, 64, 100])
def test_doubling_scan_matches_step_scan(length):
    """The log-depth scan traced graphs take (torch.compile, export, ONNX) equals the step loop."""
    from metazoo.kernels.selective_scan import _doubling_scan, _step_scan
    g = torch.Generator().manual_seed(length)
    a = torch.rand(3, length, 5, generator=g, dtype=torch.float64)  # decays in [0, 1)
    b = torch.randn(3, length, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_doubling_scan(a, b, 1), _step_scan(a, b, 1), rtol=1e-12, atol=1e-12)
