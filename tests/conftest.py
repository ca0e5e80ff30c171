"""Shared fixtures for the unit tests (helpers live in tests/fixtures/__init__.py)."""

from __future__ import annotations

import pytest

from memwatch.signals import Signals
from tests.fixtures import FakeClock, make_signals


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def signals() -> Signals:
    return make_signals()
