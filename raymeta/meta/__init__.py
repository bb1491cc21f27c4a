"""The meta step in pure torch: inner SGD step(s) on contexts, outer LG / LC objectives.

Nothing here imports Ray, DeepSpeed or MLflow; data-parallel facts enter as arguments.
"""
