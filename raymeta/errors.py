"""The error users get for bad input (other than the config tree's own ``ConfigError``)."""

from __future__ import annotations


class InputError(ValueError):
    """A data file, model path or other input a run was given is unusable; the message names
    the input (file, field) and what is wrong with it. Jobs print it in one line and exit 2."""
