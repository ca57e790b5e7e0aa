"""Resuming: an interrupted run continues from its checkpoint and ends where a straight run ends;
checkpoints made with other params or data are never resumed."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from lorapipe.checkpoints import FINGERPRINT_FILE, CheckpointError, fingerprint, latest_checkpoint
from lorapipe.config import Params
from lorapipe.lineage import code_version, library_versions
from lorapipe.training import train_adapter

STEPS = 8  # one epoch of 32 examples in batches of 4
# A checkpoint every 2 steps; dropout on, so the resumed run must restore the RNG state too.
RESUMABLE = (
    f"train.max_steps={STEPS}",
    "train.save_strategy=steps",
    "train.save_steps=2",
    "lora.dropout=0.1",
)


class KillAtStep(TrainerCallback):
    """Interrupts training right after the checkpoint of step `step` is saved, like Ctrl-C."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise KeyboardInterrupt


class FirstStep(TrainerCallback):
    """Records the global step at which this call of `train` began."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step = state.global_step


def run(params: Params, base: Path, formatted: Path, out: Path, **kw: Any) -> dict[str, Any]:
    out.mkdir()
    return train_adapter(params, base, formatted, out, out.parent / f"{out.name}-curves", **kw)


def curve(out: Path, name: str = "loss") -> list[tuple[int, float]]:
    with (out.parent / f"{out.name}-curves" / "plots" / "metrics" / f"{name}.tsv").open() as f:
        return [(int(r["step"]), float(r[name])) for r in csv.DictReader(f, delimiter="\t")]


def same_adapter(one: Path, other: Path) -> dict[str, torch.Tensor]:
    """Assert the two runs' adapters hold the same weights, to float rounding; the second's."""
    a = load_file(one / "adapter_model.safetensors")
    b = load_file(other / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    return b


# Logging every step, and every third: the checkpoint of step 4 falls inside a logging window
# (3 to 6), which the run logs at and resumes from as a straight run does (LogAtCheckpoints).
@pytest.mark.parametrize("logging_steps", [1, 3])
def test_interrupted_run_resumes_and_matches_a_straight_run(
    tiny_base: Path,
    formatted: Path,
    tmp_path: Path,
    train_params: Callable[..., Params],
    capsys: pytest.CaptureFixture[str],
    logging_steps: int,
) -> None:
    params = train_params(*RESUMABLE, f"train.logging_steps={logging_steps}")
    straight = run(params, tiny_base, formatted, tmp_path / "straight")
    assert not Path(params.paths.checkpoints).exists()  # removed once the adapter is written

    with pytest.raises(KeyboardInterrupt):
        run(params, tiny_base, formatted, tmp_path / "killed", callbacks=[KillAtStep(STEPS // 2)])
    checkpoints = Path(params.paths.checkpoints)
    assert latest_checkpoint(checkpoints) == checkpoints / f"checkpoint-{STEPS // 2}"

    halfway = load_file(checkpoints / f"checkpoint-{STEPS // 2}" / "adapter_model.safetensors")

    began = FirstStep()
    capsys.readouterr()
    resumed = run(params, tiny_base, formatted, tmp_path / "resumed", callbacks=[began])
    assert began.step == STEPS // 2 and resumed["resumed_from_step"] == STEPS // 2
    assert "train: resuming from" in capsys.readouterr().out

    assert resumed["steps"] == straight["steps"] == STEPS
    straight_curve, resumed_curve = (
        curve(tmp_path / "straight"),
        curve(tmp_path / "resumed"),
    )
    saved = range(2, STEPS + 1, 2)
    logged = sorted({*range(logging_steps, STEPS + 1, logging_steps), *saved})
    assert [s for s, _ in resumed_curve] == logged  # replayed history + new steps
    assert [s for s, _ in straight_curve] == [s for s, _ in resumed_curve]
    for (_, a), (_, b) in zip(straight_curve, resumed_curve, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-5)
    # The tokens seen count on from the checkpoint's (TRL's own count starts again at 0).
    tokens = curve(tmp_path / "straight", "num_tokens")
    assert tokens == curve(tmp_path / "resumed", "num_tokens")
    counts = [n for _, n in tokens]
    assert (
        len(counts) == len(logged) and counts[0] > 0 and all(map(float.__lt__, counts, counts[1:]))
    )
    b = same_adapter(tmp_path / "straight", tmp_path / "resumed")
    # ...and the resumed run trained on from where the interrupted one stopped.
    assert halfway.keys() == b.keys()
    assert any(not torch.equal(halfway[n], b[n]) for n in b)


def test_a_resumed_run_stops_early_where_a_straight_run_stops(
    tiny_base: Path,
    formatted: Path,
    tmp_path: Path,
    train_params: Callable[..., Params],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Early stopping's count of epochs without a better eval loss comes back with the
    checkpoint: a run killed after an epoch that did not improve stops, once resumed, at the
    same epoch as a straight run and keeps the same one (with the count back at 0 it would run
    an epoch longer)."""
    from transformers import Trainer

    # The tiny model's eval loss falls or wobbles by chance steps, so the trainer is given one
    # that is best after epoch 2 and worse after each epoch since: 2, 1, 2, 3, ... Everything
    # that acts on it (early stopping, the best checkpoint, the resume) is transformers' own.
    measured = Trainer.evaluation_loop

    def scripted(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = measured(self, *args, **kwargs)
        output.metrics["eval_loss"] = 1.0 + abs(self.state.global_step / STEPS - 2)
        return output

    monkeypatch.setattr(Trainer, "evaluation_loop", scripted)
    params = train_params(
        "train.max_steps=-1",
        "train.epochs=8",
        "train.early_stopping_patience=2",
        "train.save_strategy=epoch",
    )
    straight = run(params, tiny_base, formatted, tmp_path / "straight")
    per_epoch = STEPS  # 32 examples in batches of 4
    assert (straight["kept_step"], straight["steps"]) == (2 * per_epoch, 4 * per_epoch)
    # Killed after epoch 3, which did not improve: early stopping's count was 1.
    kill = KillAtStep(3 * per_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(params, tiny_base, formatted, tmp_path / "killed", callbacks=[kill])
    began = FirstStep()
    resumed = run(params, tiny_base, formatted, tmp_path / "resumed", callbacks=[began])
    assert began.step == 3 * per_epoch
    for key in ("steps", "kept_step", "epochs", "eval_loss"):
        assert resumed[key] == straight[key], key
    same_adapter(tmp_path / "straight", tmp_path / "resumed")  # the kept epoch's, both times


def test_checkpoints_from_other_params_are_discarded(
    tiny_base: Path,
    formatted: Path,
    tmp_path: Path,
    train_params: Callable[..., Params],
    capsys: pytest.CaptureFixture[str],
) -> None:
    params = train_params(*RESUMABLE)
    with pytest.raises(KeyboardInterrupt):
        run(params, tiny_base, formatted, tmp_path / "killed", callbacks=[KillAtStep(2)])
    checkpoints = Path(params.paths.checkpoints)
    assert json.loads((checkpoints / FINGERPRINT_FILE).read_text())["inputs"]["lora"]["r"] == 16

    began = FirstStep()
    capsys.readouterr()
    rate = params.train.learning_rate / 2
    other = train_params(*RESUMABLE, f"train.learning_rate={rate}")
    summary = run(other, tiny_base, formatted, tmp_path / "other", callbacks=[began])
    out = capsys.readouterr().out
    assert "discarding checkpoints" in out and "train.learning_rate" in out
    assert began.step == 0 and summary["resumed_from_step"] == 0


def test_checkpoints_from_other_code_or_libraries_are_discarded(
    tiny_base: Path,
    formatted: Path,
    tmp_path: Path,
    train_params: Callable[..., Params],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Steps trained by other code or library versions would end in an adapter whose lineage
    names only the new ones: a checkpoint whose fingerprint records another md5 for a train
    stage file, or another peft version, is not resumed (before, only params, data and base
    counted, and an edited training.py resumed)."""
    params = train_params(*RESUMABLE)
    with pytest.raises(KeyboardInterrupt):
        run(params, tiny_base, formatted, tmp_path / "killed", callbacks=[KillAtStep(2)])
    path = Path(params.paths.checkpoints) / FINGERPRINT_FILE
    recorded = json.loads(path.read_text())
    assert recorded["inputs"]["code"] == code_version("train") != {}
    assert recorded["inputs"]["libraries"] == library_versions()
    for part, key, was in [
        ("code", "src/lorapipe/training.py", "0" * 32),
        ("libraries", "peft", "0.1"),
    ]:
        # As the folder would be after `git pull` or `pip install -U` between the two runs.
        made = json.loads(json.dumps(recorded))
        made["inputs"][part][key] = was
        made["sha256"] = fingerprint(made["inputs"])
        path.write_text(json.dumps(made))
        began = FirstStep()
        capsys.readouterr()
        with pytest.raises(KeyboardInterrupt):
            run(params, tiny_base, formatted, tmp_path / part, callbacks=[began, KillAtStep(2)])
        out = capsys.readouterr().out
        assert f"discarding checkpoints in {path.parent}: made with different {part}.{key};" in out
        assert began.step == 0


def test_a_folder_training_did_not_write_is_left_alone(
    tiny_base: Path, formatted: Path, tmp_path: Path, train_params: Callable[..., Params]
) -> None:
    params = train_params()
    precious = Path(params.paths.checkpoints) / "notes.txt"
    precious.parent.mkdir()
    precious.write_text("mine")
    with pytest.raises(CheckpointError, match=r"paths\.checkpoints"):
        run(params, tiny_base, formatted, tmp_path / "a")
    assert precious.read_text() == "mine"
