"""Validated configs for unit tests: the schema's defaults filled, as the workflow sees them."""

from __future__ import annotations

from typing import Any

from maisi.config import validate_config

__all__ = ["validated"]

#: The smallest config the schema accepts: one phantom source.
MINIMAL = {"sources": {"phantom": {"type": "phantom", "n_cases": 2}}}


def validated(**blocks: Any) -> dict[str, Any]:
    """A minimal config plus ``blocks`` (top-level keys), validated with the schema's defaults filled."""
    return validate_config({**MINIMAL, **blocks})
