"""Using a pre-trained model for tasks: zero-shot scoring of candidate answers."""
