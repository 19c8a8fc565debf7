"""NVIDIA's post-processing of generated label maps (the step after :func:`maisi.generate.mask_generation.decode_mask`).

What NVIDIA's ``general_mask_generation_post_process`` does, step for step, so that a map generated
here is the map NVIDIA's sampler gives:

1. the body: voxels with any label, eroded once (3x3x3), reduced to its largest connected part and
   dilated back; everything outside is background;
2. tumours: every tumour class but the requested one becomes its organ (lung tumour -> lobe 28,
   pancreatic -> pancreas, hepatic -> liver, colon -> colon, bone lesion -> body); the requested one
   is closed twice, and, except hepatic tumours and bone lesions, kept to its largest part;
3. organs: liver, pancreas, spleen, kidneys, lung lobes, stomach, duodenum, gallbladder, oesophagus,
   the aorta / vena cava / portal veins (and the vertebrae unless the tumour is a bone lesion) are each
   kept to their largest part (the rest becomes body); small bowel and colon outside the largest
   connected piece of the bowel become body; each of those organs is then closed;
4. tumour-specific repairs (lung, hepatic and colon tumours, kidney masses), as NVIDIA's;
5. hepatic vessels become liver, the airway keeps its label, and the requested tumour its voxels.

"Largest part" keeps NVIDIA's rule exactly: the two largest connected regions of ``label == k``
*including the background region* are kept, which is the largest component of ``k`` whenever the
background is larger than it. Morphology is MONAI's (``dilate``/``erode``), with NVIDIA's padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms.utils_morphological_ops import dilate, erode
from scipy import ndimage, stats

__all__ = ["post_process_mask", "dilate_mask", "erode_mask", "TUMOUR_TO_HOST", "TUMOUR_SIZE_LABELS"]

#: What an unrequested tumour class becomes.
TUMOUR_TO_HOST = {23: 28, 24: 4, 26: 1, 27: 62, 128: 200}


#: The tumour of each of the last five anatomy sizes (lung, pancreatic, hepatic, colon, bone lesion).
TUMOUR_SIZE_LABELS = (23, 24, 26, 27, 128)


_ORGANS = [1, 4, 10, 12, 3, 28, 29, 30, 31, 32, 5, 14, 13, 6, 7, 8, 9, 10]
_LOBES = (28, 29, 30, 31, 32)
_HEPATIC_VESSEL, _AIRWAY, _BODY = 25, 132, 200


def dilate_mask(mask: np.ndarray, size: int = 3, pad_value: float = 0.0) -> np.ndarray:
    """MONAI's binary dilation of a 3-D mask (float32 out), a ``size``^3 kernel, the border padded with ``pad_value``."""
    t = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    return dilate(t, size, pad_value=pad_value)[0, 0].numpy()


def erode_mask(mask: np.ndarray, size: int = 3, pad_value: float = 0.0) -> np.ndarray:
    """MONAI's binary erosion of a 3-D mask (float32 out), a ``size``^3 kernel, the border padded with ``pad_value``."""
    t = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    return erode(t, size, pad_value=pad_value)[0, 0].numpy()


def _keep_largest(volume: np.ndarray, labels: Sequence[int], default: int) -> np.ndarray:
    """NVIDIA's ``supress_non_largest_components``: per label, voxels outside the two largest regions of
    its connected-component map (background region included) get ``default``."""
    out = volume.copy()
    drop = np.zeros(volume.shape, bool)
    for label in labels:
        components, _ = ndimage.label(volume == label, structure=np.ones((3, 3, 3), bool))
        values, counts = np.unique(components, return_counts=True)
        dominant = values[np.argsort(counts)[::-1][:2]]
        if len(dominant) >= 2:
            drop |= ~((components == dominant[0]) | (components == dominant[1]))
    out[drop] = default
    return out


def _close(volume: np.ndarray, label: int) -> np.ndarray:
    """NVIDIA's ``organ_fill_by_closing``: ``label``'s voxels dilated then eroded, twice (zero padding)."""
    mask = (volume == label).astype(np.float32)
    for _ in range(2):
        mask = erode_mask(dilate_mask(mask), pad_value=0.0)
    return mask.astype(bool)


def _fill_removed(volume: np.ndarray, label: int, removed: np.ndarray) -> np.ndarray:
    """NVIDIA's ``organ_fill_by_removed_mask``: ``label`` dilated three times, within ``removed``."""
    mask = (volume == label).astype(np.float32)
    for _ in range(3):
        mask = dilate_mask(mask)
    return (mask * removed).astype(bool)


def post_process_mask(volume: np.ndarray, target_tumour: int | None = None) -> np.ndarray:
    """A generated map (MAISI ids, 3-D) post-processed as NVIDIA does; ``target_tumour`` is the tumour the
    sizes asked for (:data:`TUMOUR_SIZE_LABELS`) or None."""
    volume = np.asarray(volume).astype(np.int64)
    hepatic_vessel, airway = volume == _HEPATIC_VESSEL, volume == _AIRWAY

    body = erode_mask(volume > 0, pad_value=0.0)
    body = _keep_largest(body.astype(np.int64), [1], 0)
    volume = volume * dilate_mask(body).astype(np.int64)

    for t in TUMOUR_SIZE_LABELS:
        if t != target_tumour:
            volume[volume == t] = TUMOUR_TO_HOST[t]
        else:
            volume[_close(volume, t)] = t
            volume[_close(volume, t)] = t
    if target_tumour not in (26, 128):
        volume = _keep_largest(volume, [target_tumour], _BODY)
    tumour = volume == target_tumour

    organs = _ORGANS + (list(range(33, 60)) if target_tumour != 128 else [])
    data = _keep_largest(volume, organs, _BODY)
    organ_removed = (volume - data).astype(bool)
    bowel = np.isin(data, (12, 13, 19, 62)).astype(np.int64)
    bowel = _keep_largest(bowel, [1], 0)
    bowel_removed = ((data == 19) & (bowel == 0)) | ((data == 62) & (bowel == 0))
    data[bowel_removed] = _BODY
    for organ in organs:
        data[_close(data, organ)] = organ

    if target_tumour == 23 and tumour.sum() > 0:
        ring = dilate_mask(data == 23)
        around = (data * (ring.astype(np.int64) - (data == 23).astype(np.int64))).astype(np.float32).ravel()
        around[around == 0] = np.nan
        mode = int(stats.mode(around, nan_policy="omit")[0])
        if mode in _LOBES:
            ring = dilate_mask(ring)
            lung_removed = ring.astype(np.int64) - (data == 23).astype(np.int64)
            data[_fill_removed(data, mode, lung_removed)] = mode
        ring = dilate_mask(ring)
        data[_fill_removed(data, 23, ring * organ_removed)] = 23
        for lobe in _LOBES:
            for _ in range(3):
                data[_close(data, lobe)] = lobe

    if target_tumour == 26 and tumour.sum() > 0:
        for _ in range(2):
            data[_fill_removed(data, 1, bowel_removed)] = 1
        for _ in range(2):
            data[_fill_removed(data, 3, organ_removed)] = 3
        ring = dilate_mask(dilate_mask(data == target_tumour))
        data[_fill_removed(data, target_tumour, ring * organ_removed)] = target_tumour
        liver_parts = ((data == 26).astype(np.int64) + (data == 25).astype(np.int64) + (data == 1).astype(np.int64) > 1).astype(np.int64)
        kept = _keep_largest(liver_parts, [1], 0)
        data[(liver_parts - kept).astype(bool)] = _BODY
        tumour = (tumour * kept).astype(bool)
        for _ in range(3):
            data[_close(data, 1)] = 1

    if target_tumour == 27 and tumour.sum() > 0:
        ring = dilate_mask(dilate_mask(data == target_tumour))
        data[_fill_removed(data, target_tumour, ring * organ_removed)] = target_tumour

    if target_tumour == 129 and tumour.sum() > 0:
        for organ in (5, 14):
            for _ in range(3):
                data[_close(data, organ)] = organ

    data[hepatic_vessel] = 1
    data[airway] = _AIRWAY
    if target_tumour is not None:
        data[tumour] = target_tumour
    return data.astype(np.uint8)
