"""GGUF export of the merged model for llama.cpp, Ollama and LM Studio, proven by reading it back.

`export_checked` writes `<name>-<type>.gguf` (f32, f16 or q8_0) from a merged model folder
(safetensors + tokenizer), reads each file back with transformers' GGUF loader and compares its
logits on the probe prompts with the merged model's; a file over its bound is deleted and
GgufCheckError raised. Beside each file goes an Ollama Modelfile (`<name>-<type>.Modelfile`).

Converter: the `gguf` package, llama.cpp's own Python library (pinned in constraints.txt), which
llama.cpp's converter script is built on: its `GGUFWriter` writes the file, its `TensorNameMap`
names every tensor (the same map transformers' loader reads names back with), `SpecialVocab`
writes the merges, special token ids and chat template from the tokenizer files, and
`gguf.quants.quantize` makes Q8_0 blocks (measured on SmolLM2: all 272 tensors byte-identical to
llama.cpp's own `llama_model_quantize` of the f32 export). Not `convert-hf-to-gguf` from the
package index: it installs its own top-level `gguf` module over the pinned one (which the base
stage reads GGUF with too), pulls in requests, sentencepiece and protobuf, and is a third
party's repackaging of llama.cpp's convert_hf_to_gguf.py. What that script adds for Llama is
written here, each piece proven by the read-back:
- llama.cpp's rotary layout: q and k rows are permuted per head (`permute`, the script's own
  reshape), which transformers' loader undoes on read; a wrong layout fails the f32 check.
- the vocabulary in llama.cpp's byte-level BPE form (`gpt2`): tokens by id, added special tokens
  as control tokens, and the pre-tokenizer named after the tokenizer's own (GPT-2's split).

Supported: Llama-architecture models with a byte-level BPE tokenizer that has merges (the
default SmolLM2; not the tiny test model, whose byte tokenizer has no merges: llama.cpp refuses
such a vocabulary). Memory: the writer holds the converted tensors until it writes (the model's
size in the chosen type), then the read-back loads the model once more.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorapipe.errors import PipelineError
from lorapipe.gguf_source import read_once, sha256_of
from lorapipe.lineage import LINEAGE_FILE
from lorapipe.merging import max_abs_diff


class GgufExportError(PipelineError, ValueError):
    """The merged model cannot be written as GGUF (architecture, tokenizer or chat template)."""


class GgufCheckError(PipelineError, RuntimeError):
    """An exported GGUF, read back, does not give the merged model's logits or tokens."""


@dataclass(frozen=True)
class GgufType:
    ggml: str  # gguf.GGMLQuantizationType member for 2-D weights
    file_type: str  # gguf.LlamaFileType member recorded in general.file_type
    absolute_bound: float | None = None  # allowed max |logit difference|, or
    relative_bound: float | None = None  # that as a fraction of the merged model's max |logit|


# The bounds on the read-back logit difference (float32 forward on both sides, probe prompts).
# f32 copies every weight exactly (the permutation only moves numbers): measured 0.0, bounded
# like the float32 merge. f16 rounds each weight once (relative error 2^-11), Q8_0 to 8 bits per
# block of 32; both errors are relative, so they scale with the logits. Measured as a fraction of
# max |logit| (docs/gguf-export.md): SmolLM2-135M merged with the trained adapter f16 0.0010,
# q8_0 0.055; the test suite's random 2-layer model f16 0.0026, q8_0 0.054. The bounds leave
# 3.8x (f16) and 2.7x (q8_0) over the larger and stay well under what 64 flipped bytes in one
# tensor do (0.34 of max |logit| on SmolLM2 in q8_0; a test flips bytes and fails).
GGUF_TYPES = {
    "f32": GgufType("F32", "ALL_F32", absolute_bound=1e-4),
    "f16": GgufType("F16", "MOSTLY_F16", relative_bound=0.01),
    "q8_0": GgufType("Q8_0", "MOSTLY_Q8_0", relative_bound=0.15),
}
SUPPORTED_ARCHITECTURES = ("llama",)
# llama.cpp's name for a byte-level pre-tokenizer with GPT-2's split regex (what transformers
# builds for a GGUF byte-level vocabulary, and what SmolLM2's base folder holds).
GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}


def model_name(base_name: str) -> str:
    """The exported model's name (GGUF metadata, file names): the base's, marked fine-tuned."""
    return f"{base_name.rstrip('/').rsplit('/', 1)[-1]}-lora"


def gguf_file_name(name: str, gguf_type: str) -> str:
    return f"{name}-{gguf_type}.gguf"


def allowed_diff(gguf_type: str, max_abs_logit: float) -> float:
    spec = GGUF_TYPES[gguf_type]
    if spec.absolute_bound is not None:
        return spec.absolute_bound
    assert spec.relative_bound is not None
    return spec.relative_bound * max_abs_logit


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """q or k rows from transformers' rotary layout (halves) to llama.cpp's (interleaved pairs),
    per head: llama.cpp's converter's own reshape. `n_head` is the key/value head count for k."""
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def load_merged(merged_dir: Path) -> tuple[Any, Any]:
    """The merged model in float32 (an exact up-cast of any saved dtype) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(str(merged_dir))


@torch.no_grad()
def float32_logits(model: Any, tokenizer: Any, prompts: list[str]) -> list[torch.Tensor]:
    """float32 logits of each prompt, one at a time so padding plays no part. float32, not the
    merge check's float64: both sides run the same kernels, so on equal weights the logits are
    equal to the bit, and float64 would triple the time of every read-back."""
    model.eval()
    return [model(**tokenizer(p, return_tensors="pt")).logits[0] for p in prompts]


def _config(merged_dir: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
    return config


def check_exportable(merged_dir: Path) -> None:
    """Raise GgufExportError, naming every problem, if `merged_dir` (a model folder: config and
    tokenizer files; weights not read) cannot be exported. Cheap: run it before merging."""
    config = _config(merged_dir)
    problems = []
    if config.get("model_type") not in SUPPORTED_ARCHITECTURES:
        problems.append(
            f"architecture {config.get('model_type')!r} (GGUF export writes "
            f"{', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("attention or MLP biases (llama.cpp's Llama has none)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope scaling {rope.get('rope_type')!r} (only plain RoPE is written)")
    tokenizer_file = merged_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        problems.append("no tokenizer.json (a fast byte-level BPE tokenizer is needed)")
    else:
        tokenizer = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        model, pre = tokenizer.get("model", {}), tokenizer.get("pre_tokenizer") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback"):
            problems.append(f"tokenizer model {model.get('type')!r} (needs byte-level BPE)")
        elif not model.get("merges"):
            problems.append("a BPE tokenizer without merges (llama.cpp refuses such a vocabulary)")
        if any(pre.get(key) != value for key, value in GPT2_PRE_TOKENIZER.items()):
            problems.append(
                f"pre-tokenizer {pre} (written: byte-level with GPT-2's split, llama.cpp's 'gpt-2')"
            )
    if problems:
        raise GgufExportError(
            f"merge.gguf: {merged_dir} cannot be exported to GGUF: "
            + "; ".join(problems)
            + ". Set merge.gguf: [] and convert with llama.cpp's convert_hf_to_gguf.py"
        )


def check_before_merge(base_dir: Path) -> None:
    """`check_exportable` on the base folder, which holds the config and tokenizer files the
    merged model will have: a model GGUF cannot hold stops before minutes of merging. A base
    kept as a hub pin (no config.json here) is checked after the merge instead."""
    if (base_dir / "config.json").is_file():
        check_exportable(base_dir)


def trained_system_prompt(adapter_dir: Path) -> str | None:
    """The system prompt the adapter was trained with, from its lineage (the format params
    training ran with): the Modelfile's SYSTEM, so Ollama prompts the model as training did
    whatever this run's params say. None: trained without one."""
    path = adapter_dir / LINEAGE_FILE
    trained = json.loads(path.read_text(encoding="utf-8")).get("params", {}).get("format", {})
    if "system_prompt" not in trained:
        raise GgufExportError(
            f"merge.gguf: {path} has no params.format.system_prompt, so the Modelfile's SYSTEM "
            "line would be a guess; train the adapter again with this pipeline"
        )
    return trained["system_prompt"]


def _weights(merged_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in the folder's safetensors files, in a fixed order."""
    from safetensors import safe_open

    for path in sorted(merged_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):
                yield name, f.get_tensor(name)


def _add_tensors(writer: Any, merged_dir: Path, config: dict[str, Any], gguf_type: str) -> None:
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    qtype = gguf.GGMLQuantizationType[GGUF_TYPES[gguf_type].ggml]
    for hf_name, tensor in _weights(merged_dir):
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GgufExportError(f"merge.gguf: no GGUF name for tensor {hf_name!r}")
        data = tensor.to(torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute(data, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute(data, kv_heads)
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data)  # norms stay float32 in every type, as llama.cpp has them
            continue
        try:
            kind = qtype
            packed = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # rows not a multiple of the block: f16, as llama.cpp does
            kind = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(data, kind)
        writer.add_tensor(name, packed, raw_dtype=kind)


def _add_vocab(writer: Any, merged_dir: Path, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's byte-level BPE: tokens by id (padded to the embedding's rows),
    their types, merges, special token ids, BOS behaviour and the chat template."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(merged_dir, load_merges=True, n_vocab=vocab_size)
    # Whether the tokenizer starts every text with BOS, as it does, not as its files may hint.
    probe = tokenizer("a").input_ids
    special.add_special_token["bos"] = bool(probe) and probe[0] == tokenizer.bos_token_id
    special.add_special_token.setdefault("eos", False)
    special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def write_gguf(merged_dir: Path, path: Path, gguf_type: str, *, name: str) -> None:
    """Write the model in `merged_dir` to `path` as GGUF of `gguf_type` (a GGUF_TYPES key),
    named `name` in its metadata. Raises GgufExportError for what the export cannot write."""
    import gguf

    check_exportable(merged_dir)
    config = _config(merged_dir)
    spec = GGUF_TYPES[gguf_type]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType[spec.file_type])
    if spec.ggml not in ("F32", "F16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(writer, merged_dir, config["vocab_size"])
    _add_tensors(writer, merged_dir, config, gguf_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@contextmanager
def alone(path: Path) -> Iterator[Path]:
    """`path` linked into an empty temporary folder, so a loader reads the GGUF and nothing else
    (beside the merged model it would pick up its config.json and tokenizer files)."""
    with tempfile.TemporaryDirectory(prefix="gguf-read-") as tmp:
        link = Path(tmp) / path.name
        link.symlink_to(path.resolve())
        yield link


def read_back(link: Path) -> Any:
    """The GGUF at `link` (alone in its folder: `alone`) as a float32 transformers model, through
    transformers' GGUF loader."""
    from transformers import AutoModelForCausalLM, GgufConfig

    return AutoModelForCausalLM.from_pretrained(
        str(link.parent),
        gguf_file=link.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )


def tokenizer_problems(link: Path, tokenizer: Any, prompts: list[str]) -> list[str]:
    """How the tokenizer transformers builds from the GGUF at `link` (alone in its folder:
    `alone`) differs from `tokenizer` (token ids of each prompt, chat template, EOS and padding
    token); [] when it does not."""
    from transformers import AutoTokenizer

    restored = AutoTokenizer.from_pretrained(str(link.parent), gguf_file=link.name)
    problems = [
        f"{attr} {getattr(restored, attr)!r} instead of {getattr(tokenizer, attr)!r}"
        for attr in ("eos_token", "pad_token", "chat_template")
        if getattr(restored, attr) != getattr(tokenizer, attr)
    ]
    differ = [i for i, p in enumerate(prompts) if restored(p).input_ids != tokenizer(p).input_ids]
    if differ:
        problems.append(f"token ids of probe prompts {differ}")
    return problems


def check_gguf(
    path: Path, gguf_type: str, tokenizer: Any, prompts: list[str], reference: list[torch.Tensor]
) -> dict[str, Any]:
    """Read `path` back and compare it with the merged model, whose `float32_logits` on `prompts`
    are `reference`: logits within the type's bound, and the same tokenizer. Returns the check's
    record; on failure deletes `path` and raises GgufCheckError."""
    scale = max(float(x.abs().max()) for x in reference)
    allowed = allowed_diff(gguf_type, scale)
    try:
        # One parse of the file for the config, the weights and the tokenizer (read_once):
        # transformers' loader would parse its header, the whole vocabulary, three times.
        with read_once(), alone(path) as link:
            model = read_back(link)
            diff = max_abs_diff(reference, float32_logits(model, tokenizer, prompts))
            del model
            problems = tokenizer_problems(link, tokenizer, prompts)
    except Exception as exc:  # an unreadable file fails its check like a wrong one
        diff, problems = float("nan"), [f"unreadable ({type(exc).__name__}: {exc})"]
    if not diff <= allowed:  # NaN fails too
        problems.insert(0, f"logits differ by {diff:.3g} (> {allowed:.3g} allowed for {gguf_type})")
    if problems:
        path.unlink(missing_ok=True)
        raise GgufCheckError(
            f"merge.gguf: {path.name} read back with transformers does not match the merged "
            f"model: {'; '.join(problems)}; the file was deleted and nothing was written"
        )
    return {
        "max_abs_logit_diff": diff,
        "max_logit_diff_allowed": allowed,
        "passed": True,
    }


def export_checked(
    merged_dir: Path,
    types: Sequence[str],
    *,
    name: str,
    probe_prompts: list[str],
    system_prompt: str | None,
) -> tuple[dict[str, Any], float]:
    """Write `<name>-<type>.gguf` and its Modelfile into `merged_dir` for each of `types`, each
    checked by `check_gguf` against the merged model in `merged_dir`. Returns the report
    ({type: file, sha256, size, the check's record}) and the seconds it took (kept apart: the
    report is deterministic). Raises GgufCheckError (the failing file deleted) or
    GgufExportError."""
    started = time.perf_counter()
    check_exportable(merged_dir)
    model, tokenizer = load_merged(merged_dir)
    modelfile_text = modelfile_body(tokenizer, system_prompt)  # a bad template stops us first
    reference = float32_logits(model, tokenizer, probe_prompts)
    del model
    report: dict[str, Any] = {}
    for gguf_type in dict.fromkeys(types):
        path = merged_dir / gguf_file_name(name, gguf_type)
        try:
            write_gguf(merged_dir, path, gguf_type, name=name)
        except BaseException:
            path.unlink(missing_ok=True)  # never half a file
            raise
        check = check_gguf(path, gguf_type, tokenizer, probe_prompts, reference)
        modelfile = path.with_suffix(".Modelfile")
        modelfile.write_text(f"FROM ./{path.name}\n{modelfile_text}", encoding="utf-8")
        report[gguf_type] = {
            "file": path.name,
            "modelfile": modelfile.name,
            "sha256": sha256_of(path),
            "size": path.stat().st_size,
            **check,
        }
    return report, time.perf_counter() - started


def gguf_lineage(report: dict[str, Any]) -> dict[str, Any]:
    """What the merged model's lineage records of each GGUF file: {file: type, sha256, check}."""
    keys = ("modelfile", "sha256", "size", "max_abs_logit_diff", "max_logit_diff_allowed")
    return {r["file"]: {"type": t, **{k: r[k] for k in keys}} for t, r in report.items()}


# Ollama: the Modelfile and the Go template converted from the tokenizer's chat template.

_SENTINELS = {"system": "\x1esystem-text\x1e", "user": "\x1euser-text\x1e"}
_SENTINELS["assistant"] = "\x1eassistant-text\x1e"


@dataclass(frozen=True)
class TurnFormat:
    """A chat template as per-role turns: prefix + content + suffix for each role, what it writes
    when a conversation has no system turn, and the generation prompt."""

    prefix: dict[str, str]
    suffix: dict[str, str]
    default_system: str
    generation_prompt: str

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt for the next assistant turn after `messages`, as the template renders it."""
        text = "" if messages and messages[0]["role"] == "system" else self.default_system
        for m in messages:
            text += self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]]
        return text + self.generation_prompt


def turn_format(tokenizer: Any) -> TurnFormat:
    """Read the tokenizer's chat template as per-role turns by rendering marked messages, and
    check the reading on longer conversations. Raises GgufExportError when the template is not
    of that shape (a system prompt folded into the first user turn, say)."""

    def render(roles: list[str], generation: bool = False) -> str:
        messages = [{"role": r, "content": _SENTINELS[r]} for r in roles]
        text: str = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )
        return text

    def split(text: str, role: str, at: str) -> tuple[str, str]:
        if not text.startswith(at) or text.count(_SENTINELS[role]) != 1:
            raise GgufExportError(
                "merge.gguf: the chat template does not render each message once, in order, "
                "as role prefix + content + suffix; write the Modelfile's TEMPLATE by hand"
            )
        before, after = text[len(at) :].split(_SENTINELS[role])
        return before, after

    prefix, suffix = {}, {}
    so_far = ""
    for count, role in enumerate(("system", "user", "assistant"), start=1):
        text = render(["system", "user", "assistant"][:count])
        prefix[role], suffix[role] = split(text, role, so_far)
        so_far = text
    with_prompt = render(["system", "user"], generation=True)
    plain = render(["system", "user"])
    user_turn = prefix["user"] + _SENTINELS["user"] + suffix["user"]
    user_only = render(["user"])
    if not with_prompt.startswith(plain) or not user_only.endswith(user_turn):
        raise GgufExportError(
            "merge.gguf: the chat template's generation prompt or default system turn is not "
            "plain text around the turns; write the Modelfile's TEMPLATE by hand"
        )
    fmt = TurnFormat(prefix, suffix, user_only[: -len(user_turn)], with_prompt[len(plain) :])
    for roles in (["user"], ["system", "user", "assistant", "user"], ["user", "assistant", "user"]):
        messages = [{"role": r, "content": _SENTINELS[r]} for r in roles]
        if fmt.render(messages) != render(roles, generation=True):
            raise GgufExportError(
                f"merge.gguf: the chat template renders {roles} other than as per-role turns; "
                "write the Modelfile's TEMPLATE by hand"
            )
    return fmt


def ollama_template(fmt: TurnFormat) -> str:
    """`fmt` in Ollama's Go template syntax: the system prompt (.System, else the template's
    default system turn), then each user and assistant message, then the generation prompt."""
    pieces = [*fmt.prefix.values(), *fmt.suffix.values(), fmt.default_system, fmt.generation_prompt]
    if any("{{" in p or '"""' in p for p in pieces):
        raise GgufExportError("merge.gguf: the chat template's markers contain '{{' or '\"\"\"'")
    system = f"{fmt.prefix['system']}{{{{ .System }}}}{fmt.suffix['system']}"
    if fmt.default_system:
        system = f"{{{{ if .System }}}}{system}{{{{ else }}}}{fmt.default_system}{{{{ end }}}}"
    else:
        system = f"{{{{ if .System }}}}{system}{{{{ end }}}}"
    turns = "".join(
        f'{{{{ {"if" if role == "user" else "else if"} eq .Role "{role}" }}}}'
        f"{fmt.prefix[role]}{{{{ .Content }}}}{fmt.suffix[role]}"
        for role in ("user", "assistant")
    )
    return (
        f"{system}{{{{ range .Messages }}}}{turns}{{{{ end }}}}{{{{ end }}}}{fmt.generation_prompt}"
    )


def stop_tokens(tokenizer: Any, fmt: TurnFormat) -> list[str]:
    """Where generation ends: the EOS token and the special tokens that mark turns."""
    markers = "".join([*fmt.prefix.values(), *fmt.suffix.values(), fmt.generation_prompt])
    found = [t for t in tokenizer.all_special_tokens if t in markers]
    return list(dict.fromkeys([tokenizer.eos_token, *found]))


def modelfile_body(tokenizer: Any, system_prompt: str | None) -> str:
    """The Modelfile after its FROM line: TEMPLATE, stop PARAMETERs and SYSTEM (when the model
    was trained with a system prompt)."""
    fmt = turn_format(tokenizer)
    lines = [f'TEMPLATE """{ollama_template(fmt)}"""']
    lines += [f"PARAMETER stop {json.dumps(t)}" for t in stop_tokens(tokenizer, fmt)]
    if system_prompt is not None:
        if '"""' in system_prompt:
            raise GgufExportError('merge.gguf: format.system_prompt contains """ (Modelfile quote)')
        lines.append(f'SYSTEM """{system_prompt}"""')
    return "\n".join(lines) + "\n"
