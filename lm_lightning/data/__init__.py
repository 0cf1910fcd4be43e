"""Data preparation: sources → cleaning → split → sentencepiece tokenizer → memory-mapped token files.

Entry point: :func:`lm_lightning.data.corpus.prepare_corpus`.
"""
