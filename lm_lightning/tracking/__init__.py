"""Experiment tracking: W&B (online or offline, never a prompt), CSV, TensorBoard, MLflow; run records."""
