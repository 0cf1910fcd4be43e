"""Text generation from a trained model: greedy, temperature, top-k, top-p, beam search, with a KV cache."""

from lm_lightning.generation.sampling import (
    beam_search,
    check_sampling_options,
    decoding_view,
    generate,
    generate_text,
    is_generative,
)

__all__ = ["beam_search", "check_sampling_options", "decoding_view", "generate", "generate_text", "is_generative"]
