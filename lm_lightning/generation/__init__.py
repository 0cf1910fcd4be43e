"""Text generation from a trained model: greedy, temperature, top-k, top-p, beam search, with a KV cache."""

from lm_lightning.generation.sampling import beam_search, generate, generate_text

__all__ = ["beam_search", "generate", "generate_text"]
