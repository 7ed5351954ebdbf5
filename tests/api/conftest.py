from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.stack import ApiStack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    with ApiStack(tmp_path_factory.mktemp("api-stack")) as running:
        yield running


@pytest.fixture
def fresh_stack(tmp_path: Path) -> Iterator[ApiStack]:
    with ApiStack(tmp_path) as running:
        yield running
