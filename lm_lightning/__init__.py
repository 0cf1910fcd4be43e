"""lm-lightning: train language models from scratch with Lightning, Hydra, W&B, torchmetrics and sentencepiece."""

__version__ = "0.1.0"
