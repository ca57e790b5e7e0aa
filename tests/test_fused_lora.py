"""The fused LoRA update (`lorapipe.fused_lora`): the same outputs and gradients as peft's own
layer, and peft's own path wherever the fused one does not apply."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import layer as lora_layer

from lorapipe import fused_lora
from lorapipe.config import QuantCfg
from lorapipe.fused_lora import FusedLoraLinear, _Fused4bit, fuse_lora_updates, fused_layers
from lorapipe.models import load_base_model


def peft_model(base: Path, quant: QuantCfg | None = None, **lora: Any) -> Any:
    """The tiny base with LoRA on every linear layer, B non-zero so that the update counts."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora)
    model = get_peft_model(load_base_model(base, dtype="float32", quant=quant), config)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 200, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # a padded row
    return ids, mask


def loss_and_grads(model: Any, seed: int = 2) -> tuple[torch.Tensor, list[torch.Tensor]]:
    ids, mask = batch()
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks for both computations
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return out.logits.detach(), [out.loss.detach(), *grads]


class PeftCalls:
    """Counts calls of peft's own LoRA Linear forward (or of `kind`'s)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, kind: type = lora_layer.Linear) -> None:
        self.calls = 0
        original: Callable[..., Any] = kind.forward

        def counted(module: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(module, *args, **kwargs)

        monkeypatch.setattr(kind, "forward", counted)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_layers_give_peft_outputs_and_gradients(
    tiny_base: Path, monkeypatch: pytest.MonkeyPatch, dropout: float
) -> None:
    """Logits, loss and every LoRA gradient as peft computes them (float rounding aside), also
    with LoRA dropout in training mode (the same masks)."""
    model = peft_model(tiny_base, lora_dropout=dropout)
    model.train()
    layers = sum(type(m) is lora_layer.Linear for m in model.modules())
    want_logits, want = loss_and_grads(model)

    assert fuse_lora_updates(model) == layers > 0
    assert sum(isinstance(m, FusedLoraLinear) for m in model.modules()) == layers
    spy = PeftCalls(monkeypatch)
    got_logits, got = loss_and_grads(model)
    assert spy.calls == 0  # every layer took the fused path
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    assert not torch.equal(got[0], torch.zeros(()))


def test_fused_4bit_layers_give_peft_outputs_and_gradients(
    tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QLoRA (NF4, double quantisation, float32 compute, on the CPU): the update added in place
    on bitsandbytes' output gives the logits, loss and LoRA gradients of peft's 4-bit layer
    (which copies that output and adds three more full-size tensors)."""
    from peft.tuners.lora import bnb as lora_bnb

    nf4 = QuantCfg(mode="nf4", compute_dtype="float32", double_quant=True)
    model = peft_model(tiny_base, quant=nf4, lora_dropout=0.3)
    model.train()
    layers = sum(type(m) is lora_bnb.Linear4bit for m in model.modules())
    want_logits, want = loss_and_grads(model)

    assert fuse_lora_updates(model) == layers == fused_layers(model) > 0
    spy = PeftCalls(monkeypatch, lora_bnb.Linear4bit)
    got_logits, got = loss_and_grads(model)
    assert spy.calls == 0  # every 4-bit layer took the fused path
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    assert not torch.equal(got[0], torch.zeros(()))

    # The class made on first use is the module's own attribute: a fused model pickles by name
    # and comes back fused, with the same logits.
    model.eval()
    again = pickle.loads(pickle.dumps(model))
    assert fused_layers(again) == layers
    assert type(next(m for m in again.modules() if isinstance(m, _Fused4bit))) is (
        fused_lora.FusedLoraLinear4bit
    )
    with torch.no_grad():
        again_logits = again(input_ids=batch()[0]).logits
        torch.testing.assert_close(again_logits, model(input_ids=batch()[0]).logits)
    assert spy.calls == 0

    with model.disable_adapter(), torch.no_grad():  # peft's own path again
        model(input_ids=batch()[0])
    assert spy.calls == layers


def test_peft_runs_its_own_forward_where_fusing_does_not_apply(
    tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adapters disabled, merged, under autocast, or a LoRA variant (DoRA): peft's own forward
    (for DoRA, the same result bit for bit)."""
    ids, mask = batch()
    model = peft_model(tiny_base)
    model.eval()
    fuse_lora_updates(model)
    spy = PeftCalls(monkeypatch)
    with torch.no_grad():
        fused = model(input_ids=ids, attention_mask=mask).logits
        assert spy.calls == 0
        with model.disable_adapter():
            off = model(input_ids=ids, attention_mask=mask).logits
        layers = sum(isinstance(m, FusedLoraLinear) for m in model.modules())
        assert spy.calls == layers
        model.merge_adapter()
        merged = model(input_ids=ids, attention_mask=mask).logits
        assert spy.calls == 2 * layers
    assert not torch.allclose(off, fused)  # the adapter changes the output ...
    torch.testing.assert_close(merged, fused, rtol=1e-4, atol=1e-5)  # ... and merged, the same

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.unmerge_adapter()
        calls = spy.calls
        model(input_ids=ids, attention_mask=mask)
        assert spy.calls == calls + layers  # autocast chooses dtypes: peft's own path

    dora = peft_model(tiny_base, use_dora=True)
    dora.eval()
    with torch.no_grad():
        want = dora(input_ids=ids, attention_mask=mask).logits
        assert fuse_lora_updates(dora) > 0
        assert torch.equal(dora(input_ids=ids, attention_mask=mask).logits, want)
