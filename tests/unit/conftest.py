import pytest

from raymeta.meta import engines


@pytest.fixture(autouse=True)
def fresh_warnings():
    """Each test sees the engine's fallback warnings as a new job would (once per reason)."""
    engines.WARNED.clear()
