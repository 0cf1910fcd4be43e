"""Pre-training objectives: each turns a batch into model inputs, targets and a loss."""
