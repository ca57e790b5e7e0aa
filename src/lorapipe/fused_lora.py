"""LoRA's update added inside the base layer's output buffer during training.

peft's `lora.Linear` computes `result + lora_B(lora_A(dropout(x))) * scaling`: the B product,
then a multiply and an add, each over a fresh `[tokens, out_features]` tensor, forward and
backward. `FusedLoraLinear` computes the same sum as one in-place `addmm_` on the base product
(`alpha` carries the scaling), so the update costs one small matrix product and no full-size
temporaries. On SmolLM2 (210 adapted layers, batch 8) that made a trainer step 1.08x faster
(a hand loop's 1.12x; docs/training-performance.md); losses and gradients equal peft's to
float rounding (tests/test_fused_lora.py). Written here because peft has no fused path on CPU.

QLoRA's 4-bit layers (peft's `lora.bnb.Linear4bit`) get the same: peft copies the base product
(a "defensive clone"), then makes the B product, the scaled copy and the sum, four `[tokens,
out_features]` tensors a layer; `FusedLoraLinear4bit` adds the update in place on bitsandbytes'
output, which its backward does not keep (it saves only the 4-bit weight).

Only the plain case takes the fused path: one active LoRA adapter (no DoRA or other variant, no
bias on B), not merged, a plain `torch.nn.Linear` or bitsandbytes `Linear4bit` base with no
hooks, everything in one dtype (a 4-bit base's compute dtype) and no autocast, no extra forward
arguments. Anything else runs peft's own forward, unchanged.
The adapter's weights, names and saved files are peft's: only the class of each layer object
changes.
"""

from __future__ import annotations

from functools import cache
from typing import Any, cast

import torch
from peft.tuners.lora.layer import Linear


class _FusedForward:
    """The fused forward over a base product that `_base_product` makes (module docstring)."""

    def _fusable_base(self, base: torch.nn.Module, x: torch.Tensor, lora: torch.dtype) -> bool:
        raise NotImplementedError

    def _base_product(self, base: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _fusable(self, x: torch.Tensor) -> bool:
        layer = cast(Any, self)
        if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
            return False
        name = layer.active_adapters[0]
        base = layer.base_layer
        if name not in layer.lora_A or name in layer.lora_variant:
            return False
        if layer.lora_B[name].bias is not None:
            return False
        if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"):
            return False
        if torch.is_autocast_enabled(x.device.type):  # autocast picks each product's dtype
            return False
        return self._fusable_base(base, x, layer.lora_A[name].weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or not self._fusable(x):
            return cast(torch.Tensor, super().forward(x, *args, **kwargs))  # type: ignore[misc]
        layer = cast(Any, self)
        name = layer.active_adapters[0]
        lora_a, lora_b = (cast(torch.nn.Linear, m[name]) for m in (layer.lora_A, layer.lora_B))
        dropout = cast(torch.nn.Module, layer.lora_dropout[name])
        rows = x.reshape(-1, x.shape[-1])
        out = self._base_product(layer.base_layer, rows)
        # The base product's output is not saved for its backward, so adding in place is safe.
        out.addmm_(lora_a(dropout(rows)), lora_b.weight.t(), alpha=layer.scaling[name])
        return out.view(*x.shape[:-1], out.shape[-1])


class FusedLoraLinear(_FusedForward, Linear):
    """peft's LoRA Linear with the update added by one `addmm_` (module docstring)."""

    def _fusable_base(self, base: torch.nn.Module, x: torch.Tensor, lora: torch.dtype) -> bool:
        if type(base) is not torch.nn.Linear:
            return False
        return x.dtype == base.weight.dtype == lora

    def _base_product(self, base: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        base = cast(torch.nn.Linear, base)
        return torch.nn.functional.linear(rows, base.weight, base.bias)


class _Fused4bit(_FusedForward):
    """The fused forward over a bitsandbytes `Linear4bit` base (module docstring)."""

    def _fusable_base(self, base: torch.nn.Module, x: torch.Tensor, lora: torch.dtype) -> bool:
        if not _is_linear4bit(base, "bitsandbytes."):
            return False
        compute = cast(Any, base).compute_dtype
        return x.dtype == lora and compute in (None, x.dtype)

    def _base_product(self, base: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, base(rows))


def _is_linear4bit(module: torch.nn.Module, package: str) -> bool:
    """Whether `module` is exactly a class named `Linear4bit` from `package` (a module path or
    its prefix), told by name so that neither bitsandbytes nor peft's bnb module is imported."""
    kind = type(module)
    return kind.__name__ == "Linear4bit" and kind.__module__.startswith(package)


@cache
def _fused_4bit_class() -> type:
    """`FusedLoraLinear4bit` over peft's bitsandbytes LoRA class, made on first use so that
    LoRA without quantisation never imports bitsandbytes. It is this module's
    `FusedLoraLinear4bit` attribute (below), so a fused model pickles by name."""
    from peft.tuners.lora.bnb import Linear4bit

    fused = type("FusedLoraLinear4bit", (_Fused4bit, Linear4bit), {"__module__": __name__})
    fused.__doc__ = "peft's 4-bit LoRA layer with the update added by one `addmm_`."
    return fused


def __getattr__(name: str) -> Any:
    """`FusedLoraLinear4bit`, made (and bitsandbytes imported) only when asked for."""
    if name == "FusedLoraLinear4bit":
        return _fused_4bit_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fuse_lora_updates(model: torch.nn.Module) -> int:
    """Make every peft LoRA Linear of `model` whose base is a plain `torch.nn.Linear` a
    `FusedLoraLinear`, and every peft 4-bit LoRA layer over a bitsandbytes `Linear4bit` a
    `FusedLoraLinear4bit`; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is Linear and type(module.get_base_layer()) is torch.nn.Linear:
            module.__class__ = FusedLoraLinear
            count += 1
        elif _is_linear4bit(module, "peft.tuners.lora.bnb") and _is_linear4bit(
            cast(Any, module).get_base_layer(), "bitsandbytes."
        ):
            module.__class__ = _fused_4bit_class()
            count += 1
    return count


def fused_layers(model: torch.nn.Module) -> int:
    """How many of `model`'s layers are fused ones (either kind)."""
    return sum(isinstance(m, _FusedForward) for m in model.modules())
