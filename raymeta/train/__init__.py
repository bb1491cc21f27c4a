"""Distributed training and its wiring (Ray Train workers, DeepSpeed, MLflow tracking)."""
