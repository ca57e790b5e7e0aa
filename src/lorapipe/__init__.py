"""lorapipe: a data-versioned LoRA / QLoRA fine-tuning pipeline (DVC stages, Hydra config)."""
