"""Eager calls skip torch.library's Python dispatch: the same forward/backward run as an autograd.Function.

``torch.compile`` must see the registered custom op (no graph break), so it keeps getting it; eager
code would otherwise pay the op's dispatch cost on every call (measured on an H100 host: ~0.4 ms per
backward op call, 40% of a PoolFormer-S12 training step's host time), which adds up over the hundreds
of small memory-bound kernel calls of a training step.
"""
from __future__ import annotations

import torch


def eager_or_op(op, impl, setup_context, backward):
    """Return ``call(*args)``: ``op`` while compiling, else an autograd.Function over ``impl`` with the
    op's own ``setup_context``/``backward`` (so both paths compute exactly the same thing)."""

    class _Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            ctx.set_materialize_grads(False)
            out = impl(*args)
            setup_context(ctx, args, out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        return _Eager.apply(*args)

    return call


def _traced(args) -> bool:
    """True while torch.compile / make_fx trace (dispatch modes active, fake or functional tensors)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return True
    return any(isinstance(a, torch.Tensor) and type(a) not in (torch.Tensor, torch.nn.Parameter) for a in args)


class BackwardOp:
    """``torch.library.custom_op`` for a kernel's backward: traced code gets the registered op, eager
    backward passes (plain tensors) call the implementation directly."""

    def __init__(self, name: str, fn):
        self.op = torch.library.custom_op(name, mutates_args=())(fn)
        self.fn = fn
        self.register_fake = self.op.register_fake

    def __call__(self, *args):
        return self.op(*args) if _traced(args) else self.fn(*args)


def backward_op(name: str):
    """Decorator form of :class:`BackwardOp`."""
    return lambda fn: BackwardOp(name, fn)


def grad_as(g: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor | None:
    """A kernel's fp32 gradient for an optional parameter ``p``, in ``p``'s dtype (None when ``p`` is
    absent or the kernel returned its empty placeholder)."""
    return g.to(p.dtype) if p is not None and g.numel() else None
