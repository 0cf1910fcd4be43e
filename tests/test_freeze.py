"""finetune's freeze options read the blocks a model declares (``block_lists``), not a ``.h`` attribute."""

import pytest

from lm_lightning.adaptation.optimization import freeze
from lm_lightning.errors import UserError
from lm_lightning.models.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from lm_lightning.models.ffn import FFNConfig, FFNLM
from lm_lightning.models.gpt import GPT, GPTConfig


def frozen_blocks(model) -> list[bool]:
    return [not any(p.requires_grad for p in block.parameters()) for block in model.blocks()]


def test_freezes_the_first_gpt_blocks_and_the_tables():
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=16))
    freeze(model, embeddings=True, blocks=2)
    assert frozen_blocks(model) == [True, True, False]
    assert not model.wte.weight.requires_grad


def test_encoder_decoder_blocks_freeze_in_forward_order():
    model = EncoderDecoder(EncoderDecoderConfig(vocab_size=50, block_size=16, n_layer=2, n_decoder_layer=2, n_head=2,
                                                n_embd=16))
    freeze(model, blocks=3)  # both encoder blocks, then the first decoder block
    assert frozen_blocks(model) == [True, True, True, False]


def test_a_model_without_blocks_and_too_many_blocks_are_refused():
    with pytest.raises(UserError, match="no transformer blocks to freeze"):
        freeze(FFNLM(FFNConfig(vocab_size=50, block_size=16, n_layer=1, n_embd=8, hidden=16)), blocks=1)
    with pytest.raises(UserError, match="the model has 1 blocks"):
        freeze(GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)), blocks=2)
