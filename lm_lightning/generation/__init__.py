"""Text generation from a trained model: greedy, temperature, top-k, top-p, with a KV cache."""

from lm_lightning.generation.sampling import generate, generate_text

__all__ = ["generate", "generate_text"]
