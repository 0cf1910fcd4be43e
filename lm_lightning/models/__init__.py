"""Plain ``torch.nn`` models, built from small typed configs; they know nothing of Lightning."""
