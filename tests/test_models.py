"""The base stage's three sources: the tiny build, a local folder, a hub pin."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from lorapipe.base_model import build_base
from lorapipe.config import ModelCfg
from lorapipe.models import ModelSourceError, load_base_model, require_base, source_of
from tests.conftest import ROOT, conf_group, local_model_cfg, tiny_model_cfg, transformers_nf4


def test_tiny_build_is_seeded_and_pinned(tmp_path: Path, tiny_base: Path) -> None:
    again = tmp_path / "again"
    pin = build_base(tiny_model_cfg(seed=0), again)
    assert (again / "model.safetensors").read_bytes() == (
        tiny_base / "model.safetensors"
    ).read_bytes()
    assert pin == json.loads((tiny_base / "pin.json").read_text())
    other = build_base(tiny_model_cfg(seed=1), tmp_path / "s1")
    assert other["config_hash"] != pin["config_hash"]


def base_readers() -> list[str]:
    """The dvc.yaml stages that read the base model's folder."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return sorted(
        name
        for name, spec in stages.items()
        if "${paths.base}" in spec.get("deps", spec.get("do", {}).get("deps", []))
    )


def test_the_pin_names_the_model_params_and_a_differing_key_is_named(tiny_base: Path) -> None:
    assert require_base(tiny_model_cfg(seed=0), tiny_base)["seed"] == 0
    made = tiny_model_cfg(seed=0)
    arch = made.architecture.model_copy(update={"num_layers": 3})
    other = made.model_copy(update={"name": "other", "architecture": arch})
    with pytest.raises(ModelSourceError) as caught:
        require_base(other, tiny_base)
    assert str(caught.value).startswith(f"{tiny_base} was made from other params")
    assert "model.architecture.num_layers is 3 here, 2 there; " in str(caught.value)
    assert "model.name is 'other' here, 'tiny-test' there. Make it from" in str(caught.value)
    assert "model.seed" not in str(caught.value)


def test_every_stage_that_reads_the_base_refuses_one_made_from_other_params(
    tiny_base: Path, tmp_path: Path, train_params, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m stages.train model.seed=1` (or params.yaml edited without `dvc repro`) on a
    base made with seed 0: each stage stops before it reads or writes anything."""
    import importlib

    out = tmp_path / "out"
    composed = train_params()
    paths = {key: str(out / key) for key in composed.paths.model_dump()}
    params = composed.model_copy(
        update={
            "model": tiny_model_cfg(seed=1),
            "paths": composed.paths.model_copy(update={**paths, "base": str(tiny_base)}),
        }
    )
    monkeypatch.chdir(tmp_path)
    readers = base_readers()
    assert readers == ["evaluate", "format", "merge", "references", "train"]
    for name in readers:
        with pytest.raises(ModelSourceError, match=r"model\.seed is 1 here, 0 there\. "):
            importlib.import_module(f"stages.{name}").run(params)
        assert not out.exists(), name


def test_local_folder_is_copied_and_hashed(tmp_path: Path, tiny_base: Path) -> None:
    pin = build_base(local_model_cfg(str(tiny_base)), tmp_path / "base")
    assert pin["kind"] == "local" and "model.safetensors" in pin["files_md5"]
    assert source_of(tmp_path / "base") == (str(tmp_path / "base"), None, False)
    assert load_base_model(tmp_path / "base").config.num_hidden_layers == 2


def test_local_folder_without_a_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"has no config\.json"):
        build_base(local_model_cfg(str(tmp_path)), tmp_path / "base")


def drop_tensor(folder: Path, name: str) -> None:
    """Rewrite `folder`'s model.safetensors without the tensor `name`."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors[name]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def damage(folder: Path, kind: str) -> tuple[str, str]:
    """Break the model folder `folder` in one way; the file and words its refusal must name."""
    weights = folder / "model.safetensors"
    if kind == "config not JSON":
        (folder / "config.json").write_text("{ broken")
        return "config.json", "cannot be read: Expecting property name"
    if kind == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return "model.safetensors", "is not a whole safetensors file"
    if kind == "no tokenizer.json":
        (folder / "tokenizer.json").unlink()
        return "", "the tokenizer in"
    if kind == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (folder / name).unlink()
        return "", "has no tokenizer (none of tokenizer.json"
    if kind == "missing tensor":
        drop_tensor(folder, LAYER_1_Q)
        return "", f"1 tensor(s) missing ({LAYER_1_Q})"
    assert kind == "other shape"
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    return "", "6 tensor(s) of another shape than the config gives"


LAYER_1_Q = "model.layers.1.self_attn.q_proj.weight"
DAMAGES = [
    "config not JSON",
    "truncated weights",
    "no tokenizer.json",
    "no tokenizer",
    "missing tensor",
    "other shape",
]


@pytest.mark.parametrize("kind", DAMAGES)
def test_a_damaged_local_folder_is_refused_naming_the_file(
    kind: str, tmp_path: Path, tiny_base: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The base stage loads what it copies: a folder that later stages could not load, or would
    load with random weights in place of missing ones, stops it with one line."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_base, folder)
    file, words = damage(folder, kind)
    with pytest.raises(ModelSourceError) as err:
        build_base(local_model_cfg(str(folder)), tmp_path / "base")
    message = str(err.value)
    assert len(message.splitlines()) == 1 and message.startswith("model.name: "), message
    assert f"{folder / file}" in message and words in message, message
    assert "LOAD REPORT" not in capfd.readouterr().err  # transformers' table, said in the line


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # as stored; cast tensor by tensor
def test_loading_a_base_with_a_missing_tensor_is_refused(
    dtype: str, tmp_path: Path, tiny_base: Path
) -> None:
    """A base damaged after the base stage ran would load with that weight random."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    drop_tensor(base, LAYER_1_Q)
    with pytest.raises(ModelSourceError, match=rf"{base}: .*1 tensor\(s\) missing \({LAYER_1_Q}\)"):
        load_base_model(base, dtype=dtype)


def test_unreachable_hub_model_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelCfg(
        **conf_group(
            "model",
            "tinyllama",
            name="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
            revision="main",
            strict_pin=False,
        )
    )
    with pytest.raises(ModelSourceError, match="kind: local"):
        build_base(cfg, tmp_path / "base")


def test_a_converting_load_reads_tensor_by_tensor_and_equals_from_pretrained(
    tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 from the fp32 tiny base and NF4 go through read_by_tensor (pread, one tensor at a
    time, every shard of a sharded checkpoint) and give exactly what transformers' own
    from_pretrained gives; a load in the stored dtype stays memory-mapped."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    import lorapipe.models as models
    from lorapipe.config import QuantCfg

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_base, sharded)
    (sharded / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(tiny_base).save_pretrained(sharded, max_shard_size="300KB")
    reads: list[int] = []
    real = models.read_by_tensor

    def counted(folder: Path) -> models.TensorReader | None:
        reader = real(folder)
        reads.append(len(reader.files) if reader is not None else 0)
        return reader

    monkeypatch.setattr(models, "read_by_tensor", counted)

    load_base_model(sharded, dtype="float32")  # stored dtype: no conversion, mmap
    assert reads == []
    ours = load_base_model(sharded, dtype="bfloat16")
    assert reads == [len(list(sharded.glob("*.safetensors")))] and reads[0] > 1  # every shard
    theirs = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.bfloat16)
    mine, want = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == want.keys() and all(torch.equal(mine[k], want[k]) for k in want)
    assert ours.dtype == torch.bfloat16
    assert ours.generation_config == theirs.generation_config
    assert ours.name_or_path == ours.config._name_or_path == str(sharded)

    nf4 = QuantCfg(mode="nf4", compute_dtype="float32", double_quant=True)
    quantized = load_base_model(sharded, quant=nf4)
    assert len(reads) == 2
    reference = transformers_nf4(sharded)
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    quantized.train(), reference.train()  # bitsandbytes' CPU inference kernel needs other shapes
    assert type(quantized.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert torch.equal(quantized(ids).logits, reference(ids).logits)


def run_fragment(source: str, *args: str) -> str:
    """What `source` prints, run by a fresh Python (process-wide allocator settings stay there)."""
    import subprocess

    src = str(Path(__file__).resolve().parents[1] / "src")
    return subprocess.run(
        [sys.executable, "-c", source, *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": src},
    ).stdout


FRAGMENT = """
import sys
from pathlib import Path
from lorapipe.runtime import fix_mmap_threshold
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
def anon():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024
big = b"1" * (24 << 20)  # served by mmap; freeing it raises glibc's adaptive threshold to 24 MiB
del big
before = anon()
# 128 MiB in 4 MiB blocks, each followed by a small block that stays (as the tensors a step
# keeps do), so that freed, the big ones are holes the heap cannot shrink past
pairs = [(b"2" * (4 << 20), b"3" * (64 << 10)) for _ in range(32)]
kept = [small for _, small in pairs]
del pairs
print(anon() - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
@pytest.mark.parametrize(
    ("mode", "kept_at_least", "kept_at_most"), [("adaptive", 100, None), ("fixed", None, 16)]
)
def test_a_fixed_mmap_threshold_gives_freed_blocks_back(
    mode: str, kept_at_least: int | None, kept_at_most: int | None
) -> None:
    """After a big block is freed, glibc serves 4 MiB blocks from the heap and keeps them once
    freed (the QLoRA step's ~700 MiB); with fix_mmap_threshold they go back to the system."""
    kept = int(run_fragment(FRAGMENT, mode))
    if kept_at_least is not None:
        assert kept >= kept_at_least, kept
    if kept_at_most is not None:
        assert kept <= kept_at_most, kept


REUSE = """
import resource, sys
from lorapipe.runtime import fix_mmap_threshold, keep_freed_memory
for step in sys.argv[1].split("+"):
    assert step == "default" or {"kept": keep_freed_memory, "fixed": fix_mmap_threshold}[step]()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = b"1" * (64 << 20)  # the first block of its size: fresh pages whatever the settings
del block
before = faults()
for _ in range(8):  # a pass's tensors: made, used, freed, then made again by the next pass
    block = b"1" * (64 << 20)
    del block
print(faults() - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
@pytest.mark.parametrize(
    ("steps", "reused"), [("default", False), ("kept", True), ("kept+fixed", False)]
)
def test_kept_freed_memory_serves_the_next_block_without_page_faults(
    steps: str, reused: bool
) -> None:
    """By default glibc gives a freed 64 MiB block back and the next one faults in all of its
    16,384 pages again; after keep_freed_memory it comes from the heap, already in memory;
    fix_mmap_threshold (quantised training) turns that off again."""
    faults, pages = int(run_fragment(REUSE, steps)), 8 * (64 << 20) // 4096
    if reused:
        assert faults < pages // 100, faults
    else:
        assert faults > pages // 2, faults


MIDSIZE = """
import resource, sys
from lorapipe.runtime import fix_mmap_threshold
assert fix_mmap_threshold() if sys.argv[1] == "default" else fix_mmap_threshold(int(sys.argv[1]))
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
kept = []
def step():  # a step's activations (the default model's [344, 576] fp32: ~800 KB), made and freed
    blocks = [b"1" * (800 << 10) for _ in range(32)]
    kept.append(b"2" * (64 << 10))  # what the step keeps, above them on the heap
    del blocks
step()
before = faults()
for _ in range(4):
    step()
print(faults() - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
@pytest.mark.parametrize(("threshold", "reused"), [("default", True), (str(128 << 10), False)])
def test_the_fixed_threshold_keeps_activation_sized_blocks_in_the_heap(
    threshold: str, reused: bool
) -> None:
    """fix_mmap_threshold's 2 MiB serves the default model's ~800 KB activations from the heap,
    reused step after step; at glibc's starting 128 KiB each is a fresh mmap, all of its pages
    faulted in again (what made QLoRA steps ~1.7x slower)."""
    faults, pages = int(run_fragment(MIDSIZE, threshold)), 4 * 32 * (800 << 10) // 4096
    if reused:
        assert faults < pages // 20, faults
    else:
        assert faults > pages // 2, faults


SAME_STEP = """
import sys, torch
from pathlib import Path
from lorapipe.models import load_base_model
from lorapipe.runtime import keep_freed_memory
if sys.argv[2] == "kept":
    assert keep_freed_memory()
model = load_base_model(Path(sys.argv[1]), dtype="float32")
ids = torch.randint(5, 200, (4, 24), generator=torch.Generator().manual_seed(0))
for _ in range(2):  # the second step reuses what the first freed
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
print(loss.item().hex(), grads.abs().sum().item().hex())
"""


MODES = ("default", "kept")


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_kept_freed_memory_gives_the_same_loss_and_gradients(tiny_base: Path) -> None:
    """The allocator setting changes where blocks come from, never a number: a training step's
    loss and gradients are bit-identical with and without it (each in a fresh process)."""
    default, kept = (run_fragment(SAME_STEP, str(tiny_base), mode).split() for mode in MODES)
    assert len(default) == 2 and default == kept, (default, kept)


def test_a_qlora_evaluation_on_cpu_leaves_training_gradients_exact(tiny_base: Path) -> None:
    """bitsandbytes repacks 4-bit weights for a bf16 CPU kernel with no backward the first
    time a layer runs in eval mode without gradients (the trainer's evaluation); training after
    that got wrong gradients. The pipeline's load keeps the training layout: gradients after an
    evaluation equal those before it, and eval-mode logits equal training-mode logits."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lorapipe.config import QuantCfg

    nf4 = QuantCfg(mode="nf4", compute_dtype="float32", double_quant=True)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(load_base_model(tiny_base, quant=nf4), lora)
    ids = torch.randint(5, 200, (2, 16), generator=torch.Generator().manual_seed(0))

    def gradients() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.train()
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), grads

    logits, before = gradients()
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids=ids).logits
    torch.testing.assert_close(evaluated, logits)
    _, after = gradients()
    assert before.keys() == after.keys() and len(before) == 2 * 7 * 2  # A, B x 7 x 2 layers
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)


NOTICES_SCRIPT = """
import sys
if sys.argv[1] == "stages":
    import stages  # what every `python -m stages.*` imports first
import bitsandbytes, logging, peft, transformers, warnings
config = transformers.LlamaConfig(
    vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1,
)
peft.get_peft_model(transformers.LlamaForCausalLM(config), peft.LoraConfig(r=2))
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes notice")
warnings.warn("another FutureWarning", FutureWarning)
"""


def test_stages_drop_the_two_library_notices_and_only_them(tmp_path: Path) -> None:
    """bitsandbytes' hub-kernel notice (on CPUs with AVX512-BF16) and peft's deprecated
    attribute read print on every stage run without `stages` quietening them; other notices of
    the same logger and category still print."""
    import subprocess

    script = tmp_path / "notices.py"
    script.write_text(NOTICES_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def stderr(first: str) -> str:
        run = [sys.executable, str(script), first]
        done = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        return done.stderr

    loud, quiet = stderr("libraries"), stderr("stages")
    assert "`is_gradient_checkpointing` is deprecated" in loud
    from bitsandbytes.functional import has_avx512bf16

    assert ("Failed to load CPU gemm_4bit_forward" in loud) == has_avx512bf16()
    assert "is_gradient_checkpointing" not in quiet
    assert "gemm_4bit_forward" not in quiet
    assert "another bitsandbytes notice" in quiet and "another FutureWarning" in quiet
