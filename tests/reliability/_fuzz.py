"""What the fuzz tests of tests/reliability share: hypothesis settings and the type of ``data.draw``.

Every property runs a fixed, derandomized set of examples (no example database, so runs repeat
exactly) with a 1 s deadline per example; each file sets its own ``max_examples``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

Draw = Callable[[st.SearchStrategy[Any]], Any]


def fuzz_settings(max_examples: int) -> settings:
    """The reliability fuzz settings with ``max_examples`` examples per property."""
    return settings(
        max_examples=max_examples,
        deadline=1000,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
