"""Where the checkout and the real chest CTs are."""

from __future__ import annotations

import os
from pathlib import Path

#: The repository root (``tests/helpers/`` is two levels below it).
ROOT = Path(__file__).resolve().parents[2]
#: The two real chest CTs (pyradiomics test data): ``../shared/data/real-ct`` beside the checkout, or ``$MAISI_REAL_CT``.
REAL_CT = Path(os.environ.get("MAISI_REAL_CT", ROOT.parent / "shared" / "data" / "real-ct"))
#: NVIDIA's reference code (NV-Generate-CTMR's scripts and configs), the oracle of the parity tests.
NVIDIA_REFERENCE = Path(os.environ.get("MAISI_NVIDIA_REFERENCE", ROOT.parent / "shared" / "reference" / "nv-generate-ctmr"))
