"""Tiny, real nnU-Net v2 models in the folder layout of TotalSegmentator 2.18, for offline tests.

A model written here is loaded and run by the unmodified TotalSegmentator / nnU-Net code path. Its network
is a two-stage ``PlainConvUNet`` whose weights make it a pointwise function of the voxel's HU value: every
voxel gets the class whose HU interval contains it, so the output of a synthetic CT is known in advance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path

import torch
from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS

PLANS_NAME = "nnUNetPlans"
CONFIGURATION = "3d_fullres"
LEAKY_SLOPE = 0.01
# nnU-Net sums the sliding-window logits in float16, weighted by a Gaussian that peaks at 10 and is quantized to
# subnormal values near tile corners: logits are scaled to about +-LOGIT_RANGE to keep both overflow and rounding away.
LOGIT_RANGE = 1000.0
HU_LOW, HU_HIGH = -1024.0, 3071.0  # CTNormalization clipping range
BOUND_TOLERANCE = 0.5  # HU


def _total_sub_modes() -> dict[int, tuple[str, float]]:
    """Task id -> (trainer, resample spacing in mm) of the 'fast' and 'default' modes of task 'total'."""
    modes: dict[int, tuple[str, float]] = {}
    for mode in ("fast", "default"):
        cfg = TASK_CONFIGS["total"]["sub_modes"][mode]
        ids = cfg["task_id"] if isinstance(cfg["task_id"], list) else [cfg["task_id"]]
        for task_id in ids:
            modes[int(task_id)] = (str(cfg["trainer"]), float(cfg["resample"]))
    return modes


_SUB_MODES = _total_sub_modes()
TRAINERS: dict[int, str] = {task_id: trainer for task_id, (trainer, _) in _SUB_MODES.items()}
_SPACINGS: dict[int, float] = {task_id: spacing for task_id, (_, spacing) in _SUB_MODES.items()}


def task_labels(task_id: int) -> dict[int, str]:
    """Class index -> TotalSegmentator class name of a 'total' task (297 or one of the parts 291..295)."""
    from totalsegmentator.map_to_binary import class_map, class_map_5_parts, map_taskid_to_partname_ct

    if task_id == 297:
        return dict(class_map["total"])
    if task_id in TRAINERS:
        return dict(class_map_5_parts[map_taskid_to_partname_ct[task_id]])
    raise ValueError(f"task {task_id} is not one of {sorted(TRAINERS)}")


def _default_intervals(task_id: int, labels: Mapping[int, str] | None = None) -> list[tuple[str, float]]:
    """Default HU intervals of a task: see ``write_tiny_model``."""
    if task_id == 297:
        return [("background", -900.0), ("lung_upper_lobe_left", -300.0), ("heart", 300.0), ("vertebrae_T6", math.inf)]
    labels = task_labels(task_id) if labels is None else labels
    return [("background", 0.0), (labels[min(labels)], math.inf)]


def _architecture() -> dict:
    """The plans' 'architecture' entry: a two-stage PlainConvUNet without normalization."""
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 2,
            "features_per_stage": [4, 8],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3], [3, 3, 3]],
            "strides": [[1, 1, 1], [2, 2, 2]],
            "n_conv_per_stage": [1, 1],
            "n_conv_per_stage_decoder": [1],
            "conv_bias": True,
            "norm_op": None,
            "norm_op_kwargs": None,
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"negative_slope": LEAKY_SLOPE, "inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _plans(dataset_name: str, spacing: float, patch_size: Sequence[int]) -> dict:
    """nnU-Net plans with one '3d_fullres' configuration at ``spacing`` and CT normalization x = HU / 1000."""
    patch = [int(p) for p in patch_size]
    resampling = {"order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": dataset_name,
        "plans_name": PLANS_NAME,
        "original_median_spacing_after_transp": [spacing] * 3,
        "original_median_shape_after_transp": [p * 4 for p in patch],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            CONFIGURATION: {
                "data_identifier": f"{PLANS_NAME}_{CONFIGURATION}",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": patch,
                "median_image_size_in_voxels": [p * 4 for p in patch],
                "spacing": [spacing] * 3,
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, **resampling},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, **resampling},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, **resampling},
                "architecture": _architecture(),
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": HU_HIGH,
                "mean": 0.0,
                "median": 0.0,
                "min": HU_LOW,
                "percentile_00_5": HU_LOW,
                "percentile_99_5": HU_HIGH,
                "std": 1000.0,
            }
        },
    }


def _dataset_json(labels: Mapping[int, str]) -> dict:
    """dataset.json of a single-channel CT dataset with ``labels`` (index -> name) plus background."""
    return {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{name: int(idx) for idx, name in sorted(labels.items())}},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }


def _interval_logits(intervals: Sequence[tuple[str, float]], channel_of: Mapping[str, int], n_out: int) -> tuple[list, list]:
    """Per-output-channel (slope, intercept) in x = HU / 1000 whose upper envelope follows ``intervals``."""
    names = [name for name, _ in intervals]
    bounds = [float(bound) / 1000.0 for _, bound in intervals]
    if not names:
        raise ValueError("intervals must not be empty")
    if len(set(names)) != len(names):
        raise ValueError(f"each class may occur once in intervals, got {names}")
    if unknown := [name for name in names if name not in channel_of]:
        raise ValueError(f"classes {unknown} are not labels of the model")
    if any(not b < c for b, c in pairwise(bounds)) or not all(math.isfinite(b) for b in bounds[:-1]):
        raise ValueError(f"interval bounds must be finite (but the last) and increase, got {[b for _, b in intervals]}")
    lines, intercept = [], 0.0
    for k in range(len(names)):
        if k > 0:  # lines k-1 and k cross half a HU below the bound, so integer HU at the bound go to class k
            intercept -= bounds[k - 1] - BOUND_TOLERANCE / 1000.0
        lines.append((float(k), intercept))
    x_range = (HU_LOW / 1000.0, HU_HIGH / 1000.0)
    peak = max(abs(slope * x + b) for slope, b in lines for x in x_range)
    scale = LOGIT_RANGE / peak if peak > 0 else 1.0
    slopes, intercepts = [0.0] * n_out, [-LOGIT_RANGE] * n_out  # never predicted: the envelope of the lines is >= 0
    for name, (slope, b) in zip(names, lines, strict=True):
        slopes[channel_of[name]], intercepts[channel_of[name]] = scale * slope, scale * b
    return slopes, intercepts


def _build_network(plans: dict, dataset_json: dict, trainer: str) -> torch.nn.Module:
    """The network exactly as ``nnUNetPredictor.initialize_from_trained_model_folder`` builds it."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(CONFIGURATION)
    n_in = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    trainer_class = recursive_find_trainer_class_by_name(trainer)
    return trainer_class.build_network_architecture(
        plans_manager, configuration_manager, n_in, n_out, enable_deep_supervision=False
    )


@torch.no_grad()
def _set_pointwise_weights(network: torch.nn.Module, slopes: Sequence[float], intercepts: Sequence[float]) -> None:
    """Make ``network`` compute logit_k = slopes[k] * HU / 1000 + intercepts[k] at every voxel."""
    for param in network.parameters():
        param.zero_()
    first = network.encoder.stages[0][0].convs[0].conv  # x -> (x, -x), LeakyReLU
    c = first.kernel_size[0] // 2, first.kernel_size[1] // 2, first.kernel_size[2] // 2
    first.weight[(0, 0, *c)] = 1.0
    first.weight[(1, 0, *c)] = -1.0
    # the stride-2 stage and the transposed conv stay zero: the decoder sees zeros, then the skip (channels n_up..)
    n_up = network.decoder.transpconvs[0].out_channels
    dec = network.decoder.stages[0].convs[0].conv  # (a, b) -> (a - b, b - a) = 1.01 x (-1.01 x), LeakyReLU
    c = dec.kernel_size[0] // 2, dec.kernel_size[1] // 2, dec.kernel_size[2] // 2
    dec.weight[(0, n_up, *c)], dec.weight[(0, n_up + 1, *c)] = 1.0, -1.0
    dec.weight[(1, n_up, *c)], dec.weight[(1, n_up + 1, *c)] = -1.0, 1.0
    head = network.decoder.seg_layers[-1]  # 1x1x1: (a - b) / 1.01^2 = x
    gain = (1.0 + LEAKY_SLOPE) ** 2
    slope = torch.tensor(slopes, dtype=head.weight.dtype) / gain
    head.weight[:, 0, 0, 0, 0] = slope
    head.weight[:, 1, 0, 0, 0] = -slope
    head.bias[:] = torch.tensor(intercepts, dtype=head.bias.dtype)


def write_tiny_model(
    weights_dir: str | Path,
    task_id: int = 297,
    intervals: Sequence[tuple[str, float]] | None = None,
    patch_size: Sequence[int] = (32, 32, 32),
    labels: Mapping[int, str] | None = None,
) -> Path:
    """Write a tiny model for ``task_id`` under ``weights_dir`` (a ``TOTALSEG_WEIGHTS_PATH``) and return its folder.

    Layout: ``weights_dir/<foldername>/<trainer>__nnUNetPlans__3d_fullres/{plans.json, dataset.json,
    fold_0/checkpoint_final.pth}``, the returned path being the ``<trainer>__...`` folder.

    labels: class index -> name (default ``task_labels(task_id)``); indices must be 1..n, as nnU-Net assumes.
    intervals: ordered (class name or 'background', upper HU bound) pairs: the first class is predicted for
        HU < bound_0, the second for bound_0 <= HU < bound_1, and so on; the last class also covers HU at or above
        the last bound (which may be ``inf``). Each class occurs at most once; unlisted classes are never predicted.
        Lines cross 0.5 HU below each bound; as nnU-Net sums logits in float16, HU within a few units of a bound
        may go either way.
        Default for 297: background < -900 <= lung_upper_lobe_left < -300 <= heart < 300 <= vertebrae_T6; for
        291..295: background below 0 HU and the part's first class above.
    """
    if task_id not in TRAINERS:
        raise ValueError(f"task {task_id} is not one of {sorted(TRAINERS)}")
    labels = task_labels(task_id) if labels is None else {int(k): str(v) for k, v in labels.items()}
    if sorted(labels) != list(range(1, len(labels) + 1)):
        raise ValueError(f"label indices must be 1..{len(labels)}, got {sorted(labels)}")
    intervals = _default_intervals(task_id, labels) if intervals is None else list(intervals)

    trainer = TRAINERS[task_id]
    dataset_name = TASK_ID_WEIGHTS_CONFIGS[task_id]["foldername"]
    dataset_json = _dataset_json(labels)
    plans = _plans(dataset_name, _SPACINGS[task_id], patch_size)
    network = _build_network(plans, dataset_json, trainer)
    channel_of = {"background": 0, **{name: idx for idx, name in labels.items()}}
    slopes, intercepts = _interval_logits(intervals, channel_of, len(labels) + 1)
    _set_pointwise_weights(network, slopes, intercepts)

    model_dir = Path(weights_dir) / dataset_name / f"{trainer}__{PLANS_NAME}__{CONFIGURATION}"
    (model_dir / "fold_0").mkdir(parents=True, exist_ok=True)
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=2), encoding="utf-8")
    (model_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=2), encoding="utf-8")
    checkpoint = {
        "network_weights": network.state_dict(),
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
        "current_epoch": 0,
        "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": 0, "dataset_json": dataset_json},
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": None,
    }
    torch.save(checkpoint, model_dir / "fold_0" / "checkpoint_final.pth")
    return model_dir
