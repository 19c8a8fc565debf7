"""Network presets: MAISI's released architecture (``maisi``) and a small one for CPU runs (``tiny``).

Torch-free, so that settings can be validated and the workflow planned without importing torch
(:mod:`maisi.models.networks` builds the networks from them).
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["LATENT_CHANNELS", "DOWNSAMPLE", "PRESETS", "preset"]

LATENT_CHANNELS = 4


DOWNSAMPLE = 4  # per axis, both presets


_F, _T = False, True


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "autoencoder": {
            "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": LATENT_CHANNELS,
            "num_channels": [8, 16, 16], "num_res_blocks": [1, 1, 1], "norm_num_groups": 4, "norm_eps": 1e-6,
            "attention_levels": [_F, _F, _F], "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
            "use_checkpointing": False, "use_convtranspose": False, "norm_float16": False, "num_splits": 1, "dim_split": 1,
        },
        "diffusion": {
            "spatial_dims": 3, "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS,
            "num_channels": [16, 32, 64], "attention_levels": [_F, _F, _T], "num_head_channels": [0, 0, 16],
            "num_res_blocks": 1, "norm_num_groups": 8, "norm_eps": 1e-6, "use_flash_attention": False,
            "include_top_region_index_input": True, "include_bottom_region_index_input": True, "include_spacing_input": True,
        },
        "controlnet": {"conditioning_embedding_in_channels": 8, "conditioning_embedding_num_channels": [8, 16, 16]},
        "discriminator": {"spatial_dims": 3, "num_layers_d": 2, "channels": 8, "in_channels": 1, "out_channels": 1, "norm": "INSTANCE"},
    },
    "maisi": {
        "autoencoder": {
            "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": LATENT_CHANNELS,
            "num_channels": [64, 128, 256], "num_res_blocks": [2, 2, 2], "norm_num_groups": 32, "norm_eps": 1e-6,
            "attention_levels": [_F, _F, _F], "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
            "use_checkpointing": False, "use_convtranspose": False, "norm_float16": True, "num_splits": 4, "dim_split": 1,
        },
        "diffusion": {
            "spatial_dims": 3, "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS,
            "num_channels": [64, 128, 256, 512], "attention_levels": [_F, _F, _T, _T], "num_head_channels": [0, 0, 32, 32],
            "num_res_blocks": 2, "norm_num_groups": 32, "norm_eps": 1e-6, "use_flash_attention": False,
            "include_top_region_index_input": True, "include_bottom_region_index_input": True, "include_spacing_input": True,
        },
        "controlnet": {"conditioning_embedding_in_channels": 8, "conditioning_embedding_num_channels": [8, 32, 64]},
        "discriminator": {"spatial_dims": 3, "num_layers_d": 3, "channels": 32, "in_channels": 1, "out_channels": 1, "norm": "INSTANCE"},
    },
}  # fmt: skip


def preset(name: str) -> dict[str, dict[str, Any]]:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
