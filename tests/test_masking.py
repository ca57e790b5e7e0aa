"""Loss masking as TRL's SFTTrainer actually builds it from our prompt/completion data."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from peft import LoraConfig, get_peft_model
from trl import SFTConfig, SFTTrainer

from lorapipe.formatting import format_rows
from lorapipe.models import load_base_model, load_tokenizer


def test_prompt_tokens_are_masked_and_eos_is_supervised(tiny_base: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(tiny_base)
    rows = [
        {"id": "a", "instruction": "What does `len('ab')` return?", "response": "2"},
        {"id": "b", "instruction": "Evaluate `'x' * 3`.", "response": "'xxx'"},
    ]
    data = Dataset.from_list(format_rows(rows, tok, None))
    model = get_peft_model(load_base_model(tiny_base), LoraConfig(r=2, target_modules="all-linear"))
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(tmp_path), completion_only_loss=True, report_to="none", use_cpu=True
        ),
        train_dataset=data,
        processing_class=tok,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for i, row in enumerate(rows):
        ids = batch["input_ids"][i].tolist()
        labels = batch["labels"][i].tolist()
        prompt_len = len(tok(data[i]["prompt"])["input_ids"])
        n_completion = len(row["response"]) + 1  # byte tokens of the answer, then EOS
        assert all(label == -100 for label in labels[:prompt_len])
        supervised = [t for t in labels if t != -100]
        assert supervised == ids[prompt_len : prompt_len + n_completion]
        assert supervised[-1] == tok.eos_token_id
        assert tok.decode(supervised[:-1]) == row["response"]
