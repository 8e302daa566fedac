import pytest

from test.helpers import one_thread  # noqa: F401  (the fixture, shared)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
