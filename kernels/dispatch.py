"""Choose between a kernel's Triton implementation and its plain PyTorch reference.

Precedence: the call's ``backend`` argument, then :func:`use_backend` (context), then the
``METAZOO_KERNELS`` environment variable, then ``auto`` (Triton when the tensors live on a CUDA
device and Triton imports; otherwise the reference). ``TRITON_INTERPRET=1`` lets an explicit
``backend="triton"`` run on CPU tensors, which is how the test suite checks kernels without a GPU.

Callers (mixers, blocks) decide first whether to call a kernel at all: :func:`plain_pytorch` sends
TorchScript, FX symbolic tracing and, per op (:data:`COMPILE_OPS`), torch.compile to their plain path.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading

import torch
import torch.fx

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "METAZOO_KERNELS"

_state = threading.local()


def _check(backend: str, what: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{what}={backend!r} is not a kernel backend; accepted values: {', '.join(BACKENDS)}")
    return backend


def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


_TRITON: bool | None = None


def triton_available() -> bool:
    """True when Triton imports (it is optional: the package runs without it). Probed once."""
    global _TRITON
    if _TRITON is None:
        _TRITON = _probe_triton()
    return _TRITON


def lazy_triton(build):
    """Decorate a kernel module's builder ``build(triton, tl) -> kernels`` (a namespace): it runs once,
    on the first launch, so importing the module never imports Triton; later calls return the same
    kernels.

    The builder defines the ``@triton.jit`` helpers beside the kernels, in its own scope. Triton's
    compiler resolves a kernel's calls through the kernel's globals and closure, so it finds them
    there; its interpreter (``TRITON_INTERPRET=1``) re-executes each function's source against the
    module globals only, so the helpers the kernels reach are also bound there (:func:`_publish`)."""

    @functools.cache
    def load():
        import triton
        import triton.language as tl

        kernels = build(triton, tl)
        _publish(vars(kernels).values(), build.__globals__)
        return kernels

    return load


def _publish(kernels, module_globals: dict) -> None:
    """Bind the ``@triton.jit`` helpers in the closures of ``kernels`` (transitively) in ``module_globals``."""
    from triton.runtime.jit import KernelInterface

    for kernel in kernels:
        if not isinstance(kernel, KernelInterface):  # e.g. a dtype table beside the kernels
            continue
        fn = kernel.fn
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            helper = cell.cell_contents
            if isinstance(helper, KernelInterface):
                if module_globals.setdefault(name, helper) is not helper:
                    raise RuntimeError(f"Triton helper {name!r} would shadow the module global of that name")
                _publish([helper], module_globals)


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def _scoped(attr: str, value: str):
    """Set the thread-local setting ``attr`` to ``value`` inside the block; restore it after."""
    prev = getattr(_state, attr, None)
    setattr(_state, attr, value)
    try:
        yield
    finally:
        setattr(_state, attr, prev)


def use_backend(backend: str):
    """Context manager forcing a backend for every kernel call inside it (thread-local)."""
    return _scoped("backend", _check(backend, "backend"))


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for, before looking at devices: argument > context > env > 'auto'."""
    if backend is not None:
        return _check(backend, "backend")
    ctx = getattr(_state, "backend", None)
    if ctx is not None:
        return ctx
    return _check(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


def resolve(backend: str | None = None, *tensors: torch.Tensor) -> str:
    """Return ``'triton'`` or ``'torch'`` for a call on ``tensors``.

    ``auto`` picks Triton only for CUDA tensors when Triton is importable. An explicit
    ``triton`` on CPU tensors needs the interpreter; otherwise it is an error, never a silent
    fallback. Under ``torch.compile`` the answer is a trace-time constant (no graph break).
    """
    return _resolve(backend, all(t.is_cuda for t in tensors) if tensors else False)


@torch.compiler.assume_constant_result
def _resolve(backend: str | None, on_cuda: bool) -> str:
    want = requested_backend(backend)
    if want == "torch":
        return "torch"
    if want == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(f"{ENV_VAR}/backend='triton' was requested but Triton is not importable")
    if not on_cuda and not interpret_mode():
        raise RuntimeError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter); "
            "use backend='torch' or move the tensors to a CUDA device")
    return "triton"


def dispatcher(ref):
    """Decorator of a kernel's public function (the one mixers call), given its reference ``ref``
    (same signature). Eager and ``torch.compile`` calls run the function; the
    tracers that must see plain PyTorch never reach it, because every caller branches on
    ``torch.jit.is_scripting() or plain_pytorch("<op>")`` (:func:`plain_pytorch`):

    - TorchScript compiles a call to it as a stub that raises (``torch.jit.unused``), so a scripted
      module compiles; TorchScript compiles only the caller's plain branch.
    - FX symbolic tracing reaching it (the first argument is a ``torch.fx.Proxy``) is a caller's
      missing branch: it raises, naming the branch to write.
    """
    def wrap(fn):
        first = next(iter(inspect.signature(fn).parameters))

        @functools.wraps(fn)
        def call(*args, **kwargs):
            lead = args[0] if args else kwargs.get(first)
            if isinstance(lead, torch.fx.Proxy):
                raise RuntimeError(f"{fn.__name__} was called while torch.fx traces symbolically; its caller must "
                                   f"take its plain PyTorch path (the math of {ref.__name__}): `if "
                                   f"torch.jit.is_scripting() or plain_pytorch({fn.__name__!r}): ...`")
            return fn(*args, **kwargs)

        return torch.jit.unused(call)

    return wrap


_fx_symbolic_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing)


def fx_tracing() -> bool:
    """True while ``torch.fx`` traces symbolically (not under torch.compile/export): sizes are proxies,
    so code that computes with them (input checks, position tables, Python loops over a weight's size)
    takes a path that does not. Kernel call sites use :func:`plain_pytorch`, which includes this."""
    if torch.jit.is_scripting():
        return False
    return _fx_symbolic_tracing()


# What torch.compile under CUDA graphs (the training command's default on CUDA) gets for each kernel op; a compiled
# graph that runs without them gives every op to inductor (:func:`compile_policy`). "custom" keeps the registered
# Triton op (opaque to inductor: it cannot fuse it with its neighbours), "inductor" makes the caller take its plain
# PyTorch path (the op's reference math), which inductor decomposes and fuses. A MetaFormer block's fused path follows
# the entry of its lead op: pool_mixer (PoolFormer: + group_norm1 on the moments, scale_add), norm_residual
# (ConvFormer/CAFormer: + scale_add), scale_add (one-group norm2: IdentityFormer, RandFormer, RIFormer). An entry
# follows the whole-model measurement where one exists, else the op's own (`bench/kernels.py --compiled`: fwd+bwd ms
# of the compiled custom op / compiled reference, bf16 autocast, stage shapes; bench/results/kernels_compiled.json).
# The two disagree for PoolFormer's ops: alone, each is faster given to inductor, but poolformer_s12 under
# torch.compile(mode="reduce-overhead") trains at 8345 img/s on 15.0 GPU ms per step with every op custom and at 6070
# img/s on 20.8 ms with every op given to inductor (2.49 vs 4.58 GiB; H100, bench/results/speed_poolformer_s12*.json),
# so PoolFormer's four ops stay custom. The same holds for ConvFormer's fused ops (cuDNN forward conv inside
# dwconv2d): convformer_s18 reduce-overhead trains at 4034 img/s on 31.1 GPU ms with every op custom, timm's compiled
# graph (what inductor builds from the plain path) at 3224 on 39.1 ms; inference 13710 vs 13371 img/s
# (speed_convformer_s18.json, session 10). MambaOut goes the other way: every op custom trains at 3014 vs 3557 img/s
# (42.1 vs 35.7 GPU ms), so its gated conv and layer_norm go to inductor, and its residual (scale_add) follows the
# gated conv (mixers/gated_cnn.py). Ops without a --compiled case stay "custom".
# Comments: the op alone, compiled fwd+bwd ms, custom / inductor (H100, bf16, batch 128, summed over the op's cases).
COMPILE_OPS = {
    "act_linear": "custom",            # alone 1.978 / 1.281; PoolFormer-S12's step: custom (above)
    "aff_filter": "custom",            # not measured yet
    "aggregated_attention": "custom",  # not measured yet
    "dwconv2d": "custom",              # alone 3.870 / 3.319 (Triton fwd); ConvFormer-S18's step: custom
    "gated_dwconv_linear": "inductor", # alone 3.959 / 3.337; MambaOut-tiny's step: inductor (above)
    "group_norm1": "custom",           # alone 1.518 / 1.182; PoolFormer-S12's step: custom (above)
    "layer_norm": "inductor",          # alone 1.632 / 0.981
    "norm_linear": "inductor",         # not measured; as layer_norm (MambaOut's step: inductor)
    "norm_residual": "custom",         # alone 2.681 / 2.065; ConvFormer-S18's step: custom (above)
    "pool_mixer": "custom",            # alone 1.914 / 1.307; PoolFormer-S12's step: custom (above)
    "scale_add": "custom",             # alone 1.538 / 0.759; PoolFormer-S12's step: custom (above)
    "selective_scan": "custom",        # not measured yet
    "star_relu": "inductor",           # alone 1.302 / 0.714
}
# Ops that keep the table's choice under torch.compile without CUDA graphs too: their plain paths are no
# fit for inductor (ViM2's sequential scan, AFFNet's FFT filter, TransNeXt's unfold-based attention), and
# their custom ops are what those families' compiled rows measured (bench/results/transnext.json, affnet.json).
TABLE_IN_EVERY_MODE = frozenset({"aff_filter", "aggregated_attention", "selective_scan"})
COMPILE_POLICIES = ("custom", "inductor", "table")
COMPILE_ENV_VAR = "METAZOO_COMPILE_OPS"


def _check_policy(policy: str, what: str) -> str:
    if policy not in COMPILE_POLICIES:
        raise ValueError(f"{what}={policy!r} is not a compile policy; accepted values: {', '.join(COMPILE_POLICIES)}")
    return policy


def compile_ops(policy: str):
    """Context manager overriding :data:`COMPILE_OPS` for ops traced inside it (thread-local):
    ``custom`` or ``inductor`` for every op, ``table`` for the table. A compiled graph keeps the choice
    it was traced with: call ``torch._dynamo.reset()`` before compiling again under another policy."""
    return _scoped("compile_ops", _check_policy(policy, "policy"))


def graphed_compile() -> bool | None:
    """Whether the torch.compile call tracing now replays its graphs through CUDA graphs (inductor with
    ``triton.cudagraphs``: ``mode="reduce-overhead"``, ``"max-autotune"`` or that option); None when not
    tracing, when the backend is not inductor, or when torch's tracing internals do not say."""
    try:  # dynamo's tracer and backend wrappers are internals: any change there means "unknown"
        from torch._dynamo.symbolic_convert import InstructionTranslator

        backend = InstructionTranslator.current_tx().output.compiler_fn
        if getattr(backend, "__name__", None) != "inductor":
            return None
        from torch._inductor import config

        return bool(backend.get_compiler_config().get("triton.cudagraphs", config.triton.cudagraphs))
    except Exception:
        return None


@torch.compiler.assume_constant_result
def compile_policy(op: str) -> str:
    """``'custom'`` or ``'inductor'``: what torch.compile gets for ``op``. Precedence:
    :func:`compile_ops` (context), then ``METAZOO_COMPILE_OPS``, then the table: :data:`COMPILE_OPS`
    under CUDA graphs; where inductor runs without them, inductor for every op but those of
    :data:`TABLE_IN_EVERY_MODE`. A custom op in a compiled graph costs a host-side dispatch per call
    that only CUDA graphs take away: without them every custom-op row lost to timm's compiled graph
    (H100, default mode, training img/s, ours / timm: convformer_s18 1183 / 2386 and mambaout_tiny
    2580 / 3458 in session 12; 2141 / 2815 and 1813 / 3482 in session 10), while every op given to
    inductor builds timm's graph (caformer_s18 3474 / 3350, session 9)."""
    want = getattr(_state, "compile_ops", None)
    if want is None:
        want = _check_policy(os.environ.get(COMPILE_ENV_VAR, "table").strip().lower() or "table", COMPILE_ENV_VAR)
    if want != "table":
        return want
    if op not in TABLE_IN_EVERY_MODE and graphed_compile() is False:
        return "inductor"
    return COMPILE_OPS[op]


@torch.jit.unused  # a scripted caller's `torch.jit.is_scripting() or` never reaches it
def plain_pytorch(op):
    # type: (str) -> bool
    """True when the caller of kernel op ``op`` (a :data:`COMPILE_OPS` key) must compute it in plain
    PyTorch: always while torch.fx traces symbolically (graphs of standard ops, no checks on proxies),
    and under torch.compile when :func:`compile_policy` gives ``'inductor'``. Eager calls get False
    (the kernel's dispatcher then picks Triton or the reference). Callers write
    ``torch.jit.is_scripting() or plain_pytorch("<op>")``: TorchScript folds ``is_scripting()`` and
    compiles only the plain branch of the caller."""
    if op not in COMPILE_OPS:
        raise ValueError(f"op={op!r} is not a kernel op; accepted values: {', '.join(COMPILE_OPS)}")
    if fx_tracing():
        return True
    return torch.compiler.is_compiling() and compile_policy(op) == "inductor"
