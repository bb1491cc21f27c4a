"""raymeta: meta-train language models so that one gradient step on a text acts like prompting.

``import raymeta`` is light: it imports no torch, Ray, DeepSpeed or MLflow.
"""

__version__ = "0.1.0"
