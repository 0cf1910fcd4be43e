"""Evaluation of a trained checkpoint: a text file prepared as its training corpus was (``text.py``), scored by
sliding windows or with a recurrent model's state carried over the whole file (``perplexity.py``), or through
a non-causal checkpoint's own objective (``objective.py``)."""
