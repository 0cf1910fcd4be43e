"""Moving checkpoints between lm-lightning and the wider ecosystem (Hugging Face transformers)."""
