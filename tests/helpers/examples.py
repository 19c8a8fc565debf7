"""A working directory for a dry run of one of the example configs (config/examples): its config, placeholder
weights and two small CTs with label maps as its own source."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from helpers.volumes import ct_volume, write_nifti

__all__ = ["example_workdir"]


def example_workdir(tmp_path: Path, example: Path) -> tuple[Path, dict[str, Any]]:
    """``tmp_path`` holding ``example`` as config/config.yaml, a placeholder for every weights file it names (a dry run
    only checks that the files are there) and two CTs with maps (body 200, liver 1) under its source ``my_ct``."""
    cfg = yaml.safe_load(example.read_text(encoding="utf-8"))
    (tmp_path / "config").mkdir()
    shutil.copy(example, tmp_path / "config" / "config.yaml")
    for path in [*cfg["pretrained"].values(), *(v for k, v in cfg["generate"].get("mask_generation", {}).items() if k != "steps")]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"placeholder: the dry run only checks that the file is there")
    src = cfg["sources"]["my_ct"]
    for i in range(2):
        vol = ct_volume(seed=i)
        label = np.zeros(vol.shape, np.uint8)
        label[8:30, 8:28, 4:16] = 200
        label[12:20, 12:20, 6:12] = 1
        write_nifti(tmp_path / src["path"] / src["images"].format(case=f"ct{i}"), vol.astype(np.int16))
        write_nifti(tmp_path / src["path"] / src["labels"].format(case=f"ct{i}"), label)
    return tmp_path, cfg
