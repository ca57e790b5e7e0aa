"""The matrix products of one training step, recorded and run again alone: how fast this machine
runs the step's own products, at their own shapes, with nothing else in between.

A step's fraction of the matmul peak (benchmarks/flops.py) cannot exceed what its matrix products
reach by themselves: the norms, rotary embeddings, activations, attention, loss and optimizer only
add time. `ProductRecorder` (a `TorchDispatchMode`, the hook torch's own `FlopCounterMode` uses)
notes every `mm` (also into an `out=` buffer, as TRL's fused LM head runs them), `addmm`,
`addmm_`, `bmm` and `baddbmm` a step dispatches, forward and backward, with each operand's
shape, strides and dtype; `replay_seconds` runs the same products again, in order, on random
operands of those shapes and strides (one set per distinct operand, so they stay in cache: an
upper bound), best of `repeats`. Attention's products run inside the fused SDPA
kernel and are neither recorded nor replayed (about 2% of the default step's FLOPs).

Written by hand: `torch.utils.flop_counter` counts FLOPs but keeps no shapes to run again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
PRODUCTS = {
    aten.mm.default: 0,  # the operand index of the first factor: (a, b)
    aten.mm.out: 0,  # (a, b, out=): TRL's fused LM head writes each tile into one buffer
    aten.addmm.default: 1,  # (input, a, b)
    aten.addmm_.default: 1,
    aten.bmm.default: 0,
    aten.baddbmm.default: 1,
}


@dataclass(frozen=True)
class Operand:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Product:
    op: Any
    args: tuple[Any, ...]  # Operand for each tensor, the value itself otherwise
    kwargs: tuple[tuple[str, Any], ...]

    @property
    def flops(self) -> int:
        """2 * m * k * n (times the batch for bmm): a multiply-add per term; the addition of
        `addmm`'s input is not counted (as in flops.py and torch's FlopCounterMode)."""
        a, b = self.args[PRODUCTS[self.op]], self.args[PRODUCTS[self.op] + 1]
        *batch, m, k = a.shape
        n = b.shape[-1]
        return 2 * m * k * n * (batch[0] if batch else 1)


def _spec(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return Operand(tuple(value.shape), tuple(value.stride()), value.dtype)
    return value


class ProductRecorder(TorchDispatchMode):
    """Within `with ProductRecorder() as rec:`, every matrix product dispatched (forward and
    backward) is appended to `rec.products`."""

    def __init__(self) -> None:
        super().__init__()
        self.products: list[Product] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in PRODUCTS:
            spec = tuple(_spec(a) for a in args)
            named = tuple(sorted((k, _spec(v)) for k, v in kwargs.items()))
            self.products.append(Product(func, spec, named))
        return func(*args, **kwargs)


def replay_seconds(products: list[Product], *, repeats: int = 3) -> float:
    """Best seconds of running `products` in order, once through, after a warm-up pass."""
    operands: dict[Operand, torch.Tensor] = {}

    def operand(spec: Any) -> Any:
        if not isinstance(spec, Operand):
            return spec
        if spec not in operands:
            tensor = torch.empty_strided(spec.shape, spec.stride, dtype=spec.dtype)
            operands[spec] = tensor.normal_(std=0.05)
        return operands[spec]

    calls = [
        (p.op, tuple(operand(a) for a in p.args), {k: operand(v) for k, v in p.kwargs})
        for p in products
    ]
    best = float("inf")
    for i in range(repeats + 1):
        started = time.perf_counter()
        with torch.no_grad():
            for op, args, kwargs in calls:
                op(*args, **kwargs)
        if i:  # the first pass warms up
            best = min(best, time.perf_counter() - started)
    return best


def summary(products: list[Product], seconds: float, peak: float) -> dict[str, Any]:
    """What the report keeps of a recorded step replayed alone."""
    flops = sum(p.flops for p in products)
    return {
        "products": len(products),
        "flops": flops,
        "seconds_alone": round(seconds, 6),
        "flops_per_s": round(flops / seconds),
        "matmul_peak_fraction": round(flops / seconds / peak, 4),
    }
