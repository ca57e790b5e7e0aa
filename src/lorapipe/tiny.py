"""The test model (`model=tiny`): a random 4-layer Llama built from a config, and a local tokenizer.

Nothing is downloaded. The tokenizer is byte-level (every UTF-8 string round-trips, no training
corpus needed, so the base never depends on the data) and carries a TinyLlama/Zephyr-style chat
template, so every later stage treats it exactly like a hub model loaded with `from_pretrained`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# TinyLlama-1.1B-Chat's template in behaviour: each turn is "<|role|>\n" + text + EOS + "\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens plus BOS/EOS/UNK/PAD and the chat role markers.

    It prepends BOS like Llama's tokenizer does, and pads with a dedicated PAD token so padding
    never collides with the supervised EOS.
    """
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = [UNK, BOS, EOS, PAD, *ROLE_TOKENS]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(byte_alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    bos_id = vocab[BOS]
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=2048,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def llama_config(spec: dict[str, Any], tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The LlamaConfig for `spec` (hidden_size, num_layers, num_heads, intermediate_size, ...)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        rms_norm_eps=1e-5,
        initializer_range=spec.get("initializer_range", 0.02),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def config_hash(config: LlamaConfig, seed: int) -> str:
    """A stable identity for the tiny model: sha256 of its architecture config and seed."""
    payload = json.dumps({"config": config.to_diff_dict(), "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def build_tiny_model(spec: dict[str, Any], seed: int, out_dir: Path) -> dict[str, Any]:
    """Build the seeded tiny Llama and its tokenizer and save both to `out_dir` as safetensors.

    Returns the pin recorded in lineage: kind, config hash, seed and parameter count.
    """
    tokenizer = build_tokenizer()
    config = llama_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {
        "kind": "tiny",
        "config_hash": config_hash(config, seed),
        "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
