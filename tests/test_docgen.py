"""docs/configuration.md is generated from memwatch.Config and must stay in sync."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from memwatch import Config
from memwatch._docgen import option_docs, render

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_every_option_is_documented_in_the_docstring() -> None:
    documented = option_docs()
    missing = [f.name for f in dataclasses.fields(Config) if not documented.get(f.name)]
    assert missing == []


def test_committed_reference_is_up_to_date() -> None:
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is stale: run python -m memwatch._docgen > docs/configuration.md"
    )
