"""GGUF export: every type read back within its bound, the rotary layout, a corrupted file
failing and leaving nothing, the Ollama Modelfile rendering the chat template's own prompt, the
stage's report, lineage and card; on a tiny ChatML Llama with grouped-query attention and on the
real SmolLM2 base. The slow test generates with llama.cpp itself when llama-cpp-python is
importable."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
import torch
import yaml

from lorapipe import gguf_export
from lorapipe.config import MergeCfg, Params, validate
from lorapipe.errors import PipelineError
from lorapipe.gguf_export import (
    GGUF_TYPES,
    GgufCheckError,
    GgufExportError,
    export_checked,
    modelfile_body,
    permute,
)
from lorapipe.io import write_json, write_jsonl
from lorapipe.lineage import LINEAGE_FILE, build_lineage
from lorapipe.params import compose
from tests.conftest import conf_group, tiny_model_overrides
from tests.test_merge import random_adapter

ROOT = Path(__file__).resolve().parents[1]
# SmolLM2's template: ChatML, with a default system turn when the conversation has none.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QUESTIONS = ["What does `sorted([3, 1, 2])` return?", "What does `len('hello')` return?"]


def build_chatml_tiny(out: Path) -> Path:
    """A models/base-like folder shaped like SmolLM2 in small: Llama with 4 query / 2 key-value
    heads, tied embeddings, a byte-level BPE tokenizer with merges (trained here on pyqa text)
    and a ChatML template whose <|im_end|> is EOS and padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lorapipe.pyqa import generate

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [t for r in generate(200, seed=0) for t in (r["instruction"], r["response"])]
    core.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=0.2,  # logits well away from zero, so a wrong layout shows
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json(out / "pin.json", {"kind": "tiny", "name": "chatml-tiny", "config_hash": "test"})
    return out


@pytest.fixture(scope="module")
def chatml_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_chatml_tiny(tmp_path_factory.mktemp("chatml") / "base")


def prompts_for(folder: Path) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    return [
        tok.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": "[1, 2, 3]"}],
            tokenize=False,
        )
        for q in QUESTIONS
    ]


def merged_copy(base: Path, out: Path) -> Path:
    """A merged-model-like folder: the base's weights, config and tokenizer, without its pin."""
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("pin.json", "*.gguf"))
    return out


def gguf_fields(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The GGUF's metadata (values) and tensor types by name."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t.tensor_type.name for t in reader.tensors}


def flip_bytes(path: Path, tensor: str, count: int = 64) -> None:
    """XOR `count` bytes in the middle of `tensor`'s data: a corrupted file, same size."""
    from gguf import GGUFReader

    info = next(t for t in GGUFReader(str(path)).tensors if t.name == tensor)
    start = int(info.data_offset) + int(info.n_bytes) // 2
    raw = bytearray(path.read_bytes())
    raw[start : start + count] = bytes(b ^ 0xFF for b in raw[start : start + count])
    path.write_bytes(bytes(raw))


def test_the_types_the_config_accepts_are_the_types_the_export_writes() -> None:
    (field_type,) = get_args(MergeCfg.model_fields["gguf"].annotation)
    assert set(get_args(field_type)) == set(GGUF_TYPES)
    assert MergeCfg(**conf_group("merge")).gguf == []  # off unless asked for


def test_permute_is_what_transformers_gguf_loader_undoes() -> None:
    """llama.cpp's rotary layout for q (9 heads) and k (3 key-value heads, SmolLM2's shape):
    transformers' reverse permutation restores the rows exactly, and the layout is not a no-op."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    undo = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3}).process
    rng = np.random.default_rng(0)
    for name, rows, heads in (("blk.0.attn_q.weight", 576, 9), ("blk.0.attn_k.weight", 192, 3)):
        weights = rng.standard_normal((rows, 576)).astype(np.float32)
        stored = permute(weights, heads)
        assert not np.array_equal(stored, weights)
        assert np.array_equal(undo(weights=stored, name=name).weights, weights)


def test_every_type_reads_back_within_its_bound_with_tokenizer_and_template(
    chatml_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gguf

    parsed: list[str] = []

    class Counted(gguf.GGUFReader):
        def __init__(self, path: str, mode: str = "r") -> None:
            parsed.append(Path(path).name)
            super().__init__(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", Counted)
    merged = merged_copy(chatml_base, tmp_path / "merged")
    report, seconds = export_checked(
        merged,
        ["f32", "f16", "q8_0", "f16"],  # a repeat is written once
        name="chatml-tiny-lora",
        probe_prompts=prompts_for(merged),
        system_prompt="Answer with the value only.",
    )
    assert list(report) == ["f32", "f16", "q8_0"] and seconds > 0
    # Each file's check parses it once for the config, the weights and the tokenizer
    # (transformers' loader alone would parse it three times: its vocabulary is most of the cost).
    assert parsed == [f"chatml-tiny-lora-{t}.gguf" for t in report]
    # f32 copies every weight exactly (the permutation moves numbers, changes none); f16 and
    # q8_0 round, q8_0 more, both within their bounds.
    assert report["f32"]["max_abs_logit_diff"] == 0.0
    assert 0 < report["f16"]["max_abs_logit_diff"] < report["q8_0"]["max_abs_logit_diff"]
    for gguf_type, r in report.items():
        path = merged / r["file"]
        assert r["file"] == f"chatml-tiny-lora-{gguf_type}.gguf" and r["passed"]
        assert r["max_abs_logit_diff"] <= r["max_logit_diff_allowed"]
        assert r["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert r["size"] == path.stat().st_size
        assert (merged / r["modelfile"]).read_text().startswith(f"FROM ./{r['file']}\n")
    sizes = [report[t]["size"] for t in ("f32", "f16", "q8_0")]
    assert sizes == sorted(sizes, reverse=True)
    again = tmp_path / "again.gguf"  # DVC sees a change only when the model changes
    gguf_export.write_gguf(merged, again, "q8_0", name="chatml-tiny-lora")
    assert gguf_export.sha256_of(again) == report["q8_0"]["sha256"]
    fields, types = gguf_fields(merged / report["q8_0"]["file"])
    tok = json.loads((merged / "tokenizer_config.json").read_text())
    assert (
        fields["general.architecture"] == "llama" and fields["general.name"] == "chatml-tiny-lora"
    )
    assert fields["llama.attention.head_count_kv"] == 2 and fields["general.file_type"] == 7
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.chat_template"] == CHATML and len(fields["tokenizer.ggml.merges"]) > 0
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens[fields["tokenizer.ggml.eos_token_id"]] == tok["eos_token"] == "<|im_end|>"
    assert fields["tokenizer.ggml.padding_token_id"] == fields["tokenizer.ggml.eos_token_id"]
    assert fields["tokenizer.ggml.add_bos_token"] is False  # the tokenizer adds none
    assert fields["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # specials are control tokens
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["token_embd.weight"] == "Q8_0" and types["blk.1.attn_k.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"


def test_a_wrong_rotary_layout_fails_the_f32_check_and_leaves_no_file(
    chatml_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    merged = merged_copy(chatml_base, tmp_path / "merged")
    monkeypatch.setattr(gguf_export, "permute", lambda weights, n_head: weights)
    with pytest.raises(GgufCheckError, match=r"logits differ by .* allowed for f32"):
        export_checked(
            merged, ["f32"], name="m", probe_prompts=prompts_for(merged), system_prompt=None
        )
    assert not list(merged.glob("m-*"))


def test_a_model_gguf_cannot_hold_is_refused_with_every_reason(tiny_base: Path) -> None:
    """The test suite's tiny model: a byte tokenizer without merges (llama.cpp refuses such a
    vocabulary) and no split regex."""
    with pytest.raises(GgufExportError) as err:
        gguf_export.check_exportable(tiny_base)
    assert "without merges" in str(err.value) and "pre-tokenizer" in str(err.value)
    assert "merge.gguf: []" in str(err.value)


# The stage, on the tiny ChatML model: report, lineage, card, Modelfile; a corrupted file.


def stage_params(base: Path, tmp_path: Path, *overrides: str) -> Params:
    from transformers import AutoTokenizer

    from lorapipe.formatting import format_rows
    from lorapipe.pyqa import generate

    formatted = tmp_path / "formatted"
    rows = [{"id": str(i), **r} for i, r in enumerate(generate(4, seed=3))]
    tok = AutoTokenizer.from_pretrained(str(base))
    write_jsonl(formatted / "test.jsonl", format_rows(rows, tok, "Answer with the value only."))
    adapter = random_adapter(base, tmp_path / "adapter")
    params = validate(
        compose(
            ROOT / "conf",
            [
                *tiny_model_overrides(),
                f"paths.base={base}",
                f"paths.adapter={adapter}",
                f"paths.formatted={formatted}",
                f"paths.merged={tmp_path / 'merged'}",
                f"paths.reports={tmp_path / 'reports'}",
                "merge.probe_examples=2",
                "format.system_prompt=Answer with the value only.",
                *overrides,
            ],
        )
    )
    write_json(adapter / LINEAGE_FILE, build_lineage(params, {}, base))
    return params


def test_the_stage_writes_checked_ggufs_with_modelfile_lineage_and_card(
    chatml_base: Path, tmp_path: Path
) -> None:
    from stages.merge import run

    run(stage_params(chatml_base, tmp_path, "merge.gguf=[f16,q8_0]"))
    merged, reports = tmp_path / "merged", tmp_path / "reports"
    report = json.loads((reports / "merge.json").read_text())["gguf"]
    assert set(report) == {"f16", "q8_0"}
    assert {p.name for p in merged.glob("*.gguf")} == {r["file"] for r in report.values()}
    assert report["f16"]["file"] == "chatml-tiny-lora-f16.gguf"
    lineage = json.loads((merged / LINEAGE_FILE).read_text())["merge"]["gguf"]
    card = (merged / "README.md").read_text()
    for r in report.values():
        assert (
            lineage[r["file"]]["sha256"] == r["sha256"] == gguf_export.sha256_of(merged / r["file"])
        )
        assert r["sha256"] in card and f"ollama create NAME -f {r['modelfile']}" in card
    assert "- gguf" in card.split("---")[1]  # a tag on the hub page
    modelfile = (merged / report["f16"]["modelfile"]).read_text()
    assert 'SYSTEM """Answer with the value only."""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    runtime = json.loads((reports / "runtime" / "merge.json").read_text())
    assert runtime["gguf_seconds"] > 0  # time stays out of the DVC metric
    assert "gguf_seconds" not in json.loads((reports / "merge.json").read_text())


def test_a_corrupted_export_fails_the_stage_and_nothing_is_written(
    chatml_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stages.merge import run

    write = gguf_export.write_gguf

    def write_then_corrupt(merged_dir: Path, path: Path, gguf_type: str, *, name: str) -> None:
        write(merged_dir, path, gguf_type, name=name)
        flip_bytes(path, "blk.0.attn_q.weight")

    params = stage_params(chatml_base, tmp_path, "merge.gguf=[q8_0]")
    monkeypatch.setattr(gguf_export, "write_gguf", write_then_corrupt)
    with pytest.raises(GgufCheckError, match=r"q8_0.gguf read back .* logits differ") as err:
        run(params)
    assert isinstance(err.value, PipelineError)  # the stage prints one line and exits 2
    assert not (tmp_path / "merged").exists() and not (tmp_path / "reports").exists()
    assert not list(tmp_path.glob(".tmp-merged-*"))


def test_a_model_gguf_cannot_hold_stops_the_stage_before_merging(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorapipe import merging
    from stages import merge

    params = stage_params(tiny_base, tmp_path, "merge.gguf=[f16]")
    monkeypatch.setattr(merging, "merge_adapter", lambda *a, **k: pytest.fail("merged anyway"))
    with pytest.raises(GgufExportError, match="without merges"):
        merge.run(params)


def test_an_adapter_without_its_trained_system_prompt_stops_the_stage_before_merging(
    chatml_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorapipe import merging
    from stages import merge

    params = stage_params(chatml_base, tmp_path, "merge.gguf=[f16]")
    lineage = tmp_path / "adapter" / LINEAGE_FILE
    record = json.loads(lineage.read_text())
    del record["params"]["format"]  # an older or hand-made record: not checked, not guessed
    lineage.write_text(json.dumps(record))
    monkeypatch.setattr(merging, "merge_adapter", lambda *a, **k: pytest.fail("merged anyway"))
    with pytest.raises(GgufExportError, match=r"has no params\.format\.system_prompt"):
        merge.run(params)
    assert not (tmp_path / "merged").exists()


def test_a_gguf_change_reruns_only_merge() -> None:
    """dvc.yaml: only the merge stage reads merge.* (its code deps: tests/test_dvc_deps.py)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    merge = stages["merge"]
    assert merge["params"] == ["merge"]  # the Modelfile's SYSTEM comes from the adapter's lineage
    readers = [
        n for n, s in stages.items() if any(str(p).startswith("merge") for p in s.get("params", []))
    ]
    assert readers == ["check", "merge"]  # check validates every section and computes nothing


# The Modelfile's Go template, rendered by the subset of Go's text/template it uses.


def render_go(template: str, system: str, messages: list[dict[str, str]]) -> str:
    """Render `template` as Ollama does for a chat: .System is the system messages' text joined
    by blank lines, .Messages every message. Knows text, {{ .Field }}, if / else if / else / end
    on `.System` or `eq .Role "..."`, and range .Messages; anything else fails the test."""
    parts = re.split(r"({{.*?}})", template, flags=re.S)
    pos = 0

    def block(stop: tuple[str, ...]) -> tuple[list[Any], str]:
        nonlocal pos
        nodes: list[Any] = []
        while pos < len(parts):
            part = parts[pos]
            pos += 1
            if not part.startswith("{{"):
                nodes.append(("text", part))
                continue
            action = part[2:-2].strip()
            if action in stop or any(action.startswith(s + " ") for s in stop if s == "else if"):
                return nodes, action
            if action.startswith("if "):
                branches, cond = [], action[3:]
                while True:
                    body, end = block(("else if", "else", "end"))
                    branches.append((cond, body))
                    if end == "end":
                        break
                    cond = end[len("else if ") :] if end.startswith("else if ") else "true"
                nodes.append(("if", branches))
            elif action == "range .Messages":
                body, _ = block(("end",))
                nodes.append(("range", body))
            elif re.fullmatch(r"\.(System|Content|Role)", action):
                nodes.append(("field", action[1:]))
            else:
                pytest.fail(f"template action outside the tested subset: {part}")
        return nodes, ""

    def test(cond: str, dot: dict[str, Any]) -> bool:
        if cond == "true":
            return True
        if cond == ".System":
            return bool(dot["System"])
        match = re.fullmatch(r'eq \.Role "(\w+)"', cond)
        if match is None:
            pytest.fail(f"condition outside the tested subset: {cond}")
        return bool(dot["Role"] == match.group(1))

    def run(nodes: list[Any], dot: dict[str, Any]) -> str:
        out = ""
        for kind, value in nodes:
            if kind == "text":
                out += value
            elif kind == "field":
                out += dot[value]
            elif kind == "if":
                out += next((run(body, dot) for cond, body in value if test(cond, dot)), "")
            else:
                out += "".join(
                    run(value, {"Role": m["role"], "Content": m["content"]}) for m in messages
                )
        return out

    tree, _ = block(())
    return run(tree, {"System": system})


def ollama_prompt(modelfile: str, messages: list[dict[str, str]]) -> str:
    """The prompt Ollama builds from `modelfile` for `messages`: the Modelfile's SYSTEM comes in
    as a system message when the conversation has none."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, flags=re.S | re.M)
    default = re.search(r'^SYSTEM """(.*?)"""$', modelfile, flags=re.S | re.M)
    assert template is not None
    if default and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": default.group(1)}, *messages]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return render_go(template.group(1), system, messages)


CONVERSATIONS = [
    [
        {"role": "system", "content": "Answer with the value only."},
        {"role": "user", "content": "What does `sorted([3, 1, 2])` return?"},
        {"role": "assistant", "content": "[1, 2, 3]"},
    ],
    [{"role": "user", "content": "hi"}],
    [
        {"role": "user", "content": "What does `len('ab')` return?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And `len('abc')`?"},
    ],
]


@pytest.mark.parametrize(
    "conversation", CONVERSATIONS, ids=["system-user-assistant", "user", "turns"]
)
def test_the_modelfile_renders_the_chat_templates_prompt(
    smol_tokenizer: Any, conversation: list[dict[str, str]]
) -> None:
    """Ollama's prompt from the Modelfile is the tokenizer's chat template's, to the character:
    with the system prompt given, and without (the template's own default system turn)."""
    modelfile = modelfile_body(smol_tokenizer, None)
    expected = smol_tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )
    assert ollama_prompt(modelfile, conversation) == expected
    assert "SYSTEM" not in modelfile
    assert re.findall(r"^PARAMETER stop (.*)$", modelfile, flags=re.M) == [
        '"<|im_end|>"',
        '"<|im_start|>"',
    ]


def test_the_trained_system_prompt_becomes_the_modelfiles_default(smol_tokenizer: Any) -> None:
    trained = "Answer with the value only."
    modelfile = modelfile_body(smol_tokenizer, trained)
    user = [{"role": "user", "content": "hi"}]
    expected = smol_tokenizer.apply_chat_template(
        [{"role": "system", "content": trained}, *user], tokenize=False, add_generation_prompt=True
    )
    assert ollama_prompt(modelfile, user) == expected


def test_other_turn_templates_convert_and_foreign_shapes_are_refused(tiny_base: Path) -> None:
    from transformers import AutoTokenizer

    zephyr = AutoTokenizer.from_pretrained(str(tiny_base))  # <|user|>\n ... </s>\n turns
    modelfile = modelfile_body(zephyr, None)
    for conversation in CONVERSATIONS:
        expected = zephyr.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        assert ollama_prompt(modelfile, conversation) == expected
    zephyr.chat_template = (  # Llama 2: the system prompt folded into the first user turn
        "{% for m in messages %}{% if m['role'] == 'system' %}{% set s = m['content'] %}"
        "{% elif m['role'] == 'user' %}[INST] {{ s ~ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(GgufExportError, match="TEMPLATE by hand"):
        modelfile_body(zephyr, None)


# The real default, SmolLM2-135M-Instruct.


@pytest.fixture(scope="module")
def smol_merged(smol_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 merged with a random r=4 adapter on every linear layer, as the merge stage
    writes it."""
    from lorapipe.merging import merge_adapter

    tmp = tmp_path_factory.mktemp("smol-merged")
    adapter = random_adapter(smol_base, tmp / "adapter")
    merge_adapter(smol_base, adapter, tmp / "merged", dtype="float32", probe_prompts=["hi"])
    return tmp / "merged"


def smol_prompts(tokenizer: Any) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in QUESTIONS
    ]


def test_smollm2_f16_reads_back_with_near_equal_logits(
    smol_merged: Path, smol_tokenizer: Any, tmp_path: Path
) -> None:
    merged = merged_copy(smol_merged, tmp_path / "merged")
    report, _ = export_checked(
        merged, ["f16"], name="m", probe_prompts=smol_prompts(smol_tokenizer), system_prompt=None
    )
    f16 = report["f16"]
    assert 0 < f16["max_abs_logit_diff"] <= f16["max_logit_diff_allowed"]
    fields, types = gguf_fields(merged / f16["file"])
    assert fields["llama.block_count"] == 30 and fields["llama.attention.head_count_kv"] == 3
    assert len(fields["tokenizer.ggml.tokens"]) == 49152
    assert "output.weight" not in types and types["blk.29.attn_q.weight"] == "F16"


def test_a_corrupted_smollm2_export_fails_and_leaves_no_file(
    smol_merged: Path, smol_tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    merged = merged_copy(smol_merged, tmp_path / "merged")
    write = gguf_export.write_gguf

    def write_then_corrupt(merged_dir: Path, path: Path, gguf_type: str, *, name: str) -> None:
        write(merged_dir, path, gguf_type, name=name)
        flip_bytes(path, "blk.15.ffn_down.weight")

    monkeypatch.setattr(gguf_export, "write_gguf", write_then_corrupt)
    with pytest.raises(GgufCheckError, match=r"m-f16.gguf read back .* logits differ by"):
        export_checked(
            merged,
            ["f16"],
            name="m",
            probe_prompts=smol_prompts(smol_tokenizer),
            system_prompt=None,
        )
    assert not list(merged.glob("m-f16*"))


@pytest.mark.slow
def test_llama_cpp_answers_like_the_merged_model(
    smol_merged: Path, smol_tokenizer: Any, tmp_path: Path
) -> None:
    """llama.cpp itself (llama-cpp-python) reads the exported f16 file: it tokenizes the prompts
    as the pipeline does and its greedy answers are the merged model's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    from lorapipe.generation import generate
    from lorapipe.pyqa import generate as questions

    merged = merged_copy(smol_merged, tmp_path / "merged")
    prompts = [
        smol_tokenizer.apply_chat_template(
            [{"role": "user", "content": r["instruction"]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for r in questions(8, seed=5)
    ]
    report, _ = export_checked(
        merged, ["f16"], name="m", probe_prompts=prompts[:2], system_prompt=None
    )
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    expected = generate(model, smol_tokenizer, prompts, batch_size=8, max_new_tokens=24)
    llm = llama_cpp.Llama(str(merged / report["f16"]["file"]), n_ctx=512, verbose=False, seed=0)
    answers = []
    for prompt in prompts:
        ids = smol_tokenizer(prompt).input_ids
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        out = llm.create_completion(ids, max_tokens=24, temperature=0.0, top_k=1)
        answers.append(out["choices"][0]["text"])
    same = sum(a.strip() == b.strip() for a, b in zip(answers, expected, strict=True))
    assert same >= 7, list(zip(answers, expected, strict=True))
