"""Explicit seeds: every random draw of a case comes from a seed derived from the run's seed and keys."""

from __future__ import annotations

import hashlib
import json

__all__ = ["derive_seed"]

def derive_seed(base_seed: int, *keys: str | int) -> int:
    """A stable seed in ``[0, 2**31)`` from a base seed and keys (sha256, not ``hash()``)."""
    text = json.dumps([int(base_seed), *[k if isinstance(k, (int, str)) else str(k) for k in keys]])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % (2**31)
