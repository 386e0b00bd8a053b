"""Eager calls skip torch.library's Python dispatch: the same forward/backward run as an autograd.Function.

``torch.compile`` must see the registered custom op (no graph break), so it keeps getting it; eager
code would otherwise pay the op's dispatch cost on every call (measured on an H100 host: ~0.4 ms per
backward op call, 40% of a PoolFormer-S12 training step's host time), which adds up over the hundreds
of small memory-bound kernel calls of a training step.
"""
from __future__ import annotations

import threading

import torch

_mode = threading.local()


def _run_eager(fn, args):
    """``fn(*args)`` with :func:`absent` giving None (restored after, also on error and when nested)."""
    prev = getattr(_mode, "eager", False)
    _mode.eager = True
    try:
        return fn(*args)
    finally:
        _mode.eager = prev


def absent(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """Stand-in for an output a call does not produce. A registered custom op cannot return None, so
    there it is a 0-size tensor; eager calls get None and skip the allocation (a host-side op)."""
    return None if getattr(_mode, "eager", False) else like.new_empty(0, dtype=dtype)


def or_absent(t: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """``t``, or :func:`absent` when it is None (results of nested eager calls inside an op)."""
    return t if t is not None else absent(like, dtype)


class ForwardOp:
    """A kernel's forward registered as ``torch.library.custom_op`` ``name`` (fake impl, autograd).
    Traced code (torch.compile, dispatch modes such as FlopCounterMode, fake tensors) gets the op;
    eager calls on plain tensors get an autograd.Function over ``impl`` with the op's own
    ``setup_context``/``backward`` (so both paths compute exactly the same thing)."""

    def __init__(self, name: str, impl, fake, setup_context, backward):
        self.op = torch.library.custom_op(name, mutates_args=())(impl)
        self.op.register_fake(fake)
        self.op.register_autograd(backward, setup_context=setup_context)
        self.impl = impl

        class _Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                ctx.set_materialize_grads(False)
                out = _run_eager(impl, args)
                setup_context(ctx, args, out)
                return out

            @staticmethod
            def backward(ctx, *grads):
                return backward(ctx, *grads)

        self.eager = _Eager

    def __call__(self, *args):
        return self.op(*args) if _traced(args) else self.eager.apply(*args)


def _traced(args) -> bool:
    """True while torch.compile / make_fx trace or a dispatch mode is active (fake or functional tensors)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return True
    return any(isinstance(a, torch.Tensor) and type(a) not in (torch.Tensor, torch.nn.Parameter) for a in args)


class BackwardOp:
    """``torch.library.custom_op`` for a kernel's backward: traced code gets the registered op, eager
    backward passes (plain tensors) call the implementation directly."""

    def __init__(self, name: str, fn, fake=None):
        self.op = torch.library.custom_op(name, mutates_args=())(fn)
        self.fn = fn
        self.register_fake = self.op.register_fake
        if fake is not None:
            self.register_fake(fake)

    def __call__(self, *args):
        return self.op(*args) if _traced(args) else _run_eager(self.fn, args)


def grad_as(g: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor | None:
    """A kernel's fp32 gradient for an optional parameter ``p``, in ``p``'s dtype (None when ``p`` is
    absent or the kernel returned None or its empty placeholder)."""
    return g.to(p.dtype) if p is not None and g is not None and g.numel() else None
