"""`lorapipe.whole_head`: the scored positions' logits kept on CPU give what TRL's fused LM head
gives (log-probabilities, entropy and the other per-token outputs, and their gradients), and
larger batches of positions go to TRL's kernel."""

from __future__ import annotations

import pytest
import torch
from trl.kernels import ChunkedLogProbFunction
from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS

from lorapipe import whole_head
from lorapipe.whole_head import WholeOrChunked, whole_logprobs

OUTPUTS = ("log_probs", *OPTIONAL_OUTPUTS)
VOCAB, WIDTH, POSITIONS = 3000, 48, 40


def _inputs(bias: bool) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    hidden = torch.randn(POSITIONS, WIDTH)
    weight = torch.randn(VOCAB, WIDTH) * 0.3
    b = torch.randn(VOCAB) if bias else torch.zeros(VOCAB)
    weight[7], b[7] = weight[5], b[5]  # tokens 5 and 7 tie at every position
    hidden[4:6] = 3 * weight[5]  # ...and are the top logit at positions 4 and 5
    targets = torch.randint(0, VOCAB, (POSITIONS,))
    targets[:4] = (hidden[:4] @ weight.t() + b).argmax(-1)  # some targets are the top-1
    targets[4], targets[5] = 7, 5  # a tie counts for the first of the tied tokens only
    return hidden, weight, b if bias else torch.empty(0), targets


def _outputs_and_grads(head, hidden, weight, bias, targets, settings):  # type: ignore[no-untyped-def]
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if bias.numel() else None
    out = head(hidden, weight, b, targets, *settings)
    # both differentiable outputs enter the loss, with unequal weights per position
    (-(out[0] * torch.linspace(0.5, 1.5, POSITIONS)).sum() + 0.3 * out[1].sum()).backward()
    grads = [hidden.grad, weight.grad] + ([b.grad] if b is not None else [])
    return [o.detach() for o in out], grads


@pytest.mark.parametrize(
    ("bias", "temperature", "softcap", "scale"),
    [(False, 1.0, None, 1.0), (True, 0.7, 30.0, 0.5)],
    ids=["plain", "bias-temperature-softcap-scale"],
)
def test_whole_logits_give_trls_outputs_and_gradients(
    bias: bool, temperature: float, softcap: float | None, scale: float
) -> None:
    """All five per-token outputs, and the gradients of hidden states, weights and bias through
    a loss of both differentiable ones, equal TRL's kernel's; a tie for the top logit counts for
    the first tied token only, as in TRL."""
    hidden, weight, b, targets = _inputs(bias)

    def trl(h, w, bb, t, *settings):  # type: ignore[no-untyped-def]
        return ChunkedLogProbFunction.apply(h, w, bb, t, settings[0], 1024, *settings[1:])

    settings = (temperature, softcap, scale, OUTPUTS)
    want, want_grads = _outputs_and_grads(trl, hidden, weight, b, targets, settings)
    got, got_grads = _outputs_and_grads(whole_logprobs, hidden, weight, b, targets, settings)
    for name, g, w in zip(OUTPUTS, got, want, strict=True):
        if name == "is_top1":
            assert torch.equal(g, w) and g[:4].all() and not g[4] and g[5]
            continue
        tell = lambda m, name=name: f"{name}: {m}"  # noqa: E731
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=tell)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_only_the_asked_outputs_are_computed() -> None:
    """As TRL's kernel: outputs not asked for are `None`."""
    hidden, weight, _, targets = _inputs(False)
    out = whole_logprobs(hidden, weight, None, targets, 1.0, None, 1.0, ("log_probs",))
    assert out[0] is not None and out[1:] == (None, None, None, None)


def test_large_or_non_fp32_batches_of_positions_go_to_trls_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`WholeOrChunked` keeps the logits only of positions whose logits fit in `WHOLE_MAX_BYTES`,
    in float32, without autocast; anything else runs TRL's kernel."""
    hidden, weight, _, targets = _inputs(False)
    hidden.requires_grad_()

    def kernel() -> str:
        lp = WholeOrChunked.apply(hidden, weight, None, targets, 1.0, 1024, None, 1.0, OUTPUTS)[0]
        return type(lp.grad_fn).__name__

    assert kernel() == "SubBackward0"  # whole: log-probability = target logit - log-sum-exp
    monkeypatch.setattr(whole_head, "WHOLE_MAX_BYTES", POSITIONS * VOCAB * 4 - 1)
    assert kernel() == "ChunkedLogProbFunctionBackward"
    monkeypatch.undo()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernel() == "ChunkedLogProbFunctionBackward"
    assert not whole_head.whole_fits(hidden.bfloat16(), weight.bfloat16())
