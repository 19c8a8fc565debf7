"""NVIDIA's reference implementation (``../shared/reference/nv-generate-ctmr``) as a test oracle.

The factory never imports it; tests do, to run NVIDIA's loops on the same weights, noise and
conditions as the factory. Where the folder is absent the tests that need it skip, saying so.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import pytest
from monai.networks.schedulers import DDPMScheduler

from helpers.paths import NVIDIA_REFERENCE

__all__ = ["nvidia_module", "nvidia_config", "SeededDDPM"]


def nvidia_module(name: str) -> ModuleType:
    """``scripts.<name>`` of NVIDIA's reference code; skips the test where the snapshot is absent."""
    if not (NVIDIA_REFERENCE / "scripts" / "__init__.py").is_file():
        pytest.skip(f"NVIDIA's reference code is not at {NVIDIA_REFERENCE} (set MAISI_NVIDIA_REFERENCE): no oracle to compare with")
    if str(NVIDIA_REFERENCE) not in sys.path:
        sys.path.insert(0, str(NVIDIA_REFERENCE))
    return importlib.import_module(f"scripts.{name}")


def nvidia_config(name: str):
    """Path of one of NVIDIA's ``configs/`` files; skips where the snapshot is absent."""
    path = NVIDIA_REFERENCE / "configs" / name
    if not path.is_file():
        pytest.skip(f"NVIDIA's reference configs are not at {path.parent}: no oracle to compare with")
    return path


class SeededDDPM(DDPMScheduler):
    """NVIDIA's DDPM scheduler (from its definition; ``_target_`` or ``kind`` ignored) whose steps draw from
    ``generator``: the factory's per-step noise (NVIDIA's steps draw from torch's global generator)."""

    def __init__(self, generator, definition: dict):
        super().__init__(**{k: v for k, v in definition.items() if k not in ("_target_", "kind")})
        self._generator = generator

    def step(self, model_output, timestep, sample, generator=None):
        return super().step(model_output, timestep, sample, generator=self._generator)
