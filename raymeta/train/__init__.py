"""Distributed training, sweeps and evaluation jobs (Ray Train, Ray Tune, MLflow)."""
