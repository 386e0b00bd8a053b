"""Choose between a kernel's Triton implementation and its plain PyTorch reference.

Precedence: the call's ``backend`` argument, then :func:`use_backend` (context), then the
``METAZOO_KERNELS`` environment variable, then ``auto`` (Triton when the tensors live on a CUDA
device and Triton imports; otherwise the reference). ``TRITON_INTERPRET=1`` lets an explicit
``backend="triton"`` run on CPU tensors, which is how the test suite checks kernels without a GPU.
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
def use_backend(backend: str):
    """Context manager forcing a backend for every kernel call inside it (thread-local)."""
    _check(backend, "backend")
    prev = getattr(_state, "backend", None)
    _state.backend = backend
    try:
        yield
    finally:
        _state.backend = prev


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
    (same signature). Eager and ``torch.compile`` calls run the function. Two tracers never enter it:

    - TorchScript compiles a call to it as a stub that raises (``torch.jit.unused``), so a scripted
      module compiles; its ``torch.jit.is_scripting()`` branch must compute the result in plain PyTorch.
    - FX symbolic tracing (the first argument is a ``torch.fx.Proxy``) records one ``call_function``
      node of ``ref`` instead of running the checks and the backend choice on proxies; the traced
      graph then runs the reference on real tensors.
    """
    def wrap(fn):
        first = next(iter(inspect.signature(fn).parameters))

        @functools.wraps(fn)
        def call(*args, **kwargs):
            lead = args[0] if args else kwargs.get(first)
            if isinstance(lead, torch.fx.Proxy):
                return lead.tracer.create_proxy("call_function", ref, args, kwargs)
            return fn(*args, **kwargs)

        call.reference = ref
        return torch.jit.unused(call)

    return wrap


_fx_symbolic_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing)


def fx_tracing() -> bool:
    """True while ``torch.fx`` traces symbolically (not under torch.compile/export): models then take
    their plain-PyTorch path, so graphs hold standard ops and no control flow runs on traced values.
    Callers write ``torch.jit.is_scripting() or fx_tracing()``: TorchScript compiles only the branch
    that literal selects."""
    if torch.jit.is_scripting():
        return False
    return _fx_symbolic_tracing()
