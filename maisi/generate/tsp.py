"""Tensor-splitting-parallel (TSP) decoding of MAISI latents: exact, slab-streamed, memory-lean.

MAISI decodes 512x512x768 volumes by splitting the autoencoder's feature maps into overlapping
segments. MONAI's implementation (``num_splits``/``dim_split`` in ``MaisiConvolution``) splits
every convolution's input, runs the pieces and concatenates them again, and its group norms work
on the whole map; on a CPU it saves almost no memory, because every layer still materialises its
full input and output (and the concatenation copies them once more).

:class:`TSPDecoder` runs the same decoder (it reads the weights of an ``AutoencoderKlMaisi``) as a
stream of slabs along one spatial axis:

- every feature map is stored *slab-major*: a list of contiguous slabs, one per segment;
- a convolution computes output slab ``i`` from input slabs ``i-1, i, i+1`` (an exact halo of
  ``kernel // 2`` voxels, zeros only at the volume's own borders) and, since the slabs are
  processed in order, frees input slab ``i-1`` as soon as slab ``i`` is done: a layer's output
  takes the memory its input no longer needs, so two full-size maps never coexist;
- group-norm statistics are gathered over the whole volume while each map is produced
  (per-channel mean and sum of squared deviations, merged slab by slab in float64 with Chan's
  formula), and the normalisation, SiLU and the following convolution are fused per slab;
- a residual block runs in two streamed passes (``conv1`` with the 1x1 shortcut, then ``conv2``
  accumulated in place into the shortcut's slabs);
- upsampling (trilinear x2 + convolution) is computed per slab from a one-voxel low-resolution
  halo, which reproduces ``F.interpolate`` exactly;
- the last convolution writes each slab straight into the preallocated output volume.

Slabs can be spread over several devices (one worker thread per device), and the full-size maps
can live in host memory (optionally as float16/bfloat16) while slabs stream through the GPUs.
With float32 storage the result equals MONAI's unsplit decode up to float32 rounding.

MONAI's own decode (unsplit or with ``num_splits``) and MONAI's sliding-window inference stay
available through :func:`decode_latent` for comparison.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from maisi.generate.settings import STORAGE_DTYPES, DecodeSettings

__all__ = ["TSPDecoder", "decode_latent", "monai_decode", "sliding_window_decode", "split_bounds", "prompt_host_release"]

_DTYPES = {name: getattr(torch, name) for name in STORAGE_DTYPES}


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def prompt_host_release(threshold: int = 1 << 20) -> bool:
    """From now on, serve this process's allocations above ``threshold`` bytes with mmap (glibc only).

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB); blocks below
    it come from the heap, where freed slabs of one size are not reused by temporaries of another
    and stay resident, so a streaming decode would grow well past what it holds (measured at 128^3
    with the released architecture: 1.6 GiB above the loaded baseline, against 1.2 GiB with this
    setting). The price is page faults on every fresh block (about a fifth of the decode time on
    two CPU cores). Returns whether the call took effect (``False`` off glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def split_bounds(length: int, thickness: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(length)`` in slabs of ``thickness`` (the last may be thinner)."""
    if length < 1 or thickness < 1:
        raise ValueError(f"cannot split length {length} into slabs of {thickness}")
    return [(a, min(a + thickness, length)) for a in range(0, length, thickness)]


class _Stats:
    """Per-channel count, mean and sum of squared deviations of a map, merged slab by slab.

    Slab statistics come from ``torch.var_mean`` in float32; they are merged in slab order in
    float64 with Chan et al.'s pairwise formula, so the result does not depend on how many devices
    produced the slabs.
    """

    def __init__(self, n_slabs: int):
        self.parts: list[tuple[int, torch.Tensor, torch.Tensor] | None] = [None] * n_slabs

    def add(self, index: int, slab: torch.Tensor) -> None:
        flat = slab.reshape(slab.shape[0], -1)
        var, mean = torch.var_mean(flat.float(), dim=1, correction=0)
        n = flat.shape[1]
        self.parts[index] = (n, mean.double().cpu(), (var.double() * n).cpu())

    def merged(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        count, mean, m2 = 0, None, None
        for part in self.parts:
            if part is None:
                raise RuntimeError("statistics are missing for a slab")
            n, m, s = part
            if mean is None:
                count, mean, m2 = n, m.clone(), s.clone()
                continue
            total = count + n
            delta = m - mean
            mean += delta * (n / total)
            m2 += s + delta.square() * (count * n / total)
            count = total
        return count, mean, m2  # type: ignore[return-value]

    def group_affine(self, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(scale, shift)`` such that ``norm(x) == x * scale + shift`` over the whole map."""
        count, mean, m2 = self.merged()
        groups = norm.num_groups
        channels = mean.numel()
        per = channels // groups
        mean_c, m2_c = mean.view(groups, per), m2.view(groups, per)
        mean_g = mean_c.mean(1, keepdim=True)
        m2_g = m2_c.sum(1, keepdim=True) + count * (mean_c - mean_g).square().sum(1, keepdim=True)
        var_g = m2_g / (count * per)
        inv = (var_g + norm.eps).rsqrt().expand(groups, per).reshape(channels)
        mean_g = mean_g.expand(groups, per).reshape(channels)
        weight = norm.weight.detach().double().cpu() if norm.affine else torch.ones(channels, dtype=torch.float64)
        bias = norm.bias.detach().double().cpu() if norm.affine else torch.zeros(channels, dtype=torch.float64)
        scale = weight * inv
        return scale.float(), (bias - mean_g * scale).float()


class _Ledger:
    """Bytes held by stored slabs (current and peak), so tests can check the memory bound exactly."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._lock = threading.Lock()

    def change(self, delta: int) -> None:
        with self._lock:
            self.current += delta
            self.peak = max(self.peak, self.current)


class _Map:
    """A ``(C, X, Y, Z)`` feature map held as contiguous slabs along one spatial axis."""

    def __init__(self, channels: int, shape: Sequence[int], axis: int, bounds: list[tuple[int, int]], ledger: _Ledger):
        self.channels = int(channels)
        self.shape = tuple(int(n) for n in shape)
        self.axis = axis
        self.bounds = bounds
        self.ledger = ledger
        self.slabs: list[torch.Tensor | None] = [None] * len(bounds)
        self.stats: _Stats | None = None

    def put(self, index: int, slab: torch.Tensor | None) -> None:
        old = self.slabs[index]
        self.slabs[index] = slab
        new_bytes = slab.numel() * slab.element_size() if slab is not None else 0
        old_bytes = old.numel() * old.element_size() if old is not None else 0
        self.ledger.change(new_bytes - old_bytes)

    @property
    def length(self) -> int:
        return self.shape[self.axis]

    def pieces(self, lo: int, hi: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, view)`` of the stored slices in ``[lo, hi)``, slab by slab."""
        dim = self.axis + 1
        for (a, b), slab in zip(self.bounds, self.slabs, strict=True):
            if b <= lo or a >= hi:
                continue
            if slab is None:
                raise RuntimeError(f"slab [{a}, {b}) was already released")
            start, stop = max(lo, a), min(hi, b)
            yield start, slab.narrow(dim, start - a, stop - start)

    def gather(self, lo: int, hi: int, device: torch.device) -> torch.Tensor:
        """Slices ``[lo, hi)`` along the axis as one float32 tensor on ``device`` (a view when possible)."""
        pieces = [p.to(device=device, dtype=torch.float32, non_blocking=True) for _, p in self.pieces(lo, hi)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=self.axis + 1)

    def fill(self, out: torch.Tensor, lo: int, affine: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Write slices ``[lo, lo + out.shape[axis])`` into ``out`` (float32, on its device), as
        ``x * scale + shift`` when ``affine`` is given, without an intermediate copy."""
        dim = self.axis + 1
        for start, view_in in self.pieces(lo, lo + out.shape[dim]):
            piece = view_in.to(device=out.device, dtype=torch.float32, non_blocking=True)
            stop = start + piece.shape[dim]
            view = out.narrow(dim, start - lo, stop - start)
            if affine is None:
                view.copy_(piece)
            else:
                torch.addcmul(affine[1], piece, affine[0], out=view)

    def release_below(self, coord: int) -> None:
        """Free the slabs that end at or before ``coord`` along the axis (no later slab needs them)."""
        for i, (_, b) in enumerate(self.bounds):
            if b <= coord and self.slabs[i] is not None:
                self.put(i, None)


def _conv3d(module: nn.Module) -> nn.Conv3d:
    """The ``nn.Conv3d`` inside a MONAI convolution wrapper; only stride-1, odd, cubic kernels stream."""
    conv = module if isinstance(module, nn.Conv3d) else next((m for m in module.modules() if isinstance(m, nn.Conv3d)), None)
    if conv is None:
        raise TypeError(f"{type(module).__name__} holds no Conv3d (transposed convolutions are not supported)")
    k = conv.kernel_size
    if conv.stride != (1, 1, 1) or conv.dilation != (1, 1, 1) or conv.groups != 1 or len(set(k)) != 1 or k[0] % 2 == 0:
        raise TypeError(f"unsupported convolution for slab streaming: {conv}")
    if conv.padding != (k[0] // 2,) * 3:
        raise TypeError(f"expected 'same' padding in {conv}")
    return conv


class TSPDecoder:
    """Slab-streamed decoding with the weights of a MONAI ``AutoencoderKlMaisi`` (see the module doc).

    Args:
        autoencoder: the trained autoencoder (its ``post_quant_conv`` and ``decoder`` are used).
        devices: compute devices; slab ``i`` runs on ``devices[i % len(devices)]``.
        axis: spatial axis (0, 1, 2) the slabs run along.
        slab: slab thickness in latent voxels (0: 2 on the CPU, 4 on GPUs), doubled at each upsampling.
        min_slab_mb: thinnest slab, as MB of the level's widest float32 map; lower levels use thicker slabs.
        storage: device that holds the full-size maps (default: the first compute device).
        storage_dtype: precision of the stored maps (float32 keeps the decode exact).
        progress: show a tqdm bar over the streamed passes.
        prompt_release: when the maps live in host memory, call :func:`prompt_host_release` so that
            freed slabs and temporaries go back to the system at once (a process-wide allocator setting).
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        devices: Sequence[torch.device | str] = ("cpu",),
        axis: int = 0,
        slab: int = 0,
        storage: torch.device | str | None = None,
        storage_dtype: torch.dtype = torch.float32,
        progress: bool = False,
        prompt_release: bool = True,
        min_slab_mb: float = 16.0,
    ):
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
        self.devices = [torch.device(d) for d in devices] or [torch.device("cpu")]
        self.axis = axis
        self.slab = int(slab) or (4 if self.devices[0].type == "cuda" else 2)
        self.min_slab_bytes = int(min_slab_mb * 2**20)
        self.storage = torch.device(storage) if storage is not None else self.devices[0]
        self.storage_dtype = storage_dtype
        self.progress = progress
        if prompt_release and self.storage.type == "cpu":
            prompt_host_release()
        self.plan = self._plan(autoencoder)
        self._weights: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.ledger = _Ledger()  # bytes of stored feature maps during the last decode (``ledger.peak``)

    # ---- the decoder as a list of streamable steps

    @staticmethod
    def _plan(autoencoder: nn.Module) -> list[tuple[str, Any]]:
        from monai.apps.generation.maisi.networks.autoencoderkl_maisi import (
            MaisiConvolution,
            MaisiGroupNorm3D,
            MaisiResBlock,
            MaisiUpsample,
        )

        steps: list[tuple[str, Any]] = [("conv", (_conv3d(autoencoder.post_quant_conv), None))]
        pending: nn.GroupNorm | None = None
        for block in autoencoder.decoder.blocks:
            if isinstance(block, MaisiGroupNorm3D):
                if pending is not None:
                    raise TypeError("two group norms in a row are not supported")
                pending = block
            elif isinstance(block, MaisiConvolution):
                steps.append(("conv", (_conv3d(block), pending)))
                pending = None
            elif isinstance(block, MaisiResBlock) and pending is None:
                shortcut = None if isinstance(block.nin_shortcut, nn.Identity) else _conv3d(block.nin_shortcut)
                steps.append(("res", (block.norm1, _conv3d(block.conv1), block.norm2, _conv3d(block.conv2), shortcut)))
            elif isinstance(block, MaisiUpsample) and pending is None and not block.use_convtranspose:
                steps.append(("up", _conv3d(block.conv)))
            else:
                raise TypeError(
                    f"the TSP decoder cannot stream {type(block).__name__} (attention blocks and transposed "
                    "convolutions need the whole map; use decoder.method 'monai' or 'sliding_window')"
                )
        if pending is not None:
            raise TypeError("the decoder ends with a group norm")
        return steps

    def _weight(self, conv: nn.Conv3d, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (id(conv), device)
        if key not in self._weights:
            w = conv.weight.detach().to(device=device, dtype=torch.float32)
            b = conv.bias.detach().to(device=device, dtype=torch.float32) if conv.bias is not None else None
            self._weights[key] = (w, b)
        return self._weights[key]

    # ---- streamed passes

    def _store(self, y: torch.Tensor) -> torch.Tensor:
        return y.to(device=self.storage, dtype=self.storage_dtype)

    def _run(self, n: int, job: Callable[[int, torch.device], int], src: _Map | None, keep_src: bool, bar) -> None:
        """Run ``job(i, device)`` for every output slab in order, in waves of one slab per device; each job
        returns the first input coordinate the next slab reads: the input slabs below it are freed."""
        ndev = len(self.devices)
        pool = ThreadPoolExecutor(ndev) if ndev > 1 else None
        try:
            for start in range(0, n, ndev):
                idx = range(start, min(start + ndev, n))
                if pool is None:
                    lows = [job(start, self.devices[0])]
                else:
                    lows = list(pool.map(lambda i: job(i, self.devices[i % ndev]), idx))
                if src is not None and not keep_src:
                    src.release_below(lows[-1])
                if bar is not None:
                    bar.update(len(idx))
        finally:
            if pool is not None:
                pool.shutdown()
        if src is not None and not keep_src:
            src.release_below(src.length)

    def _slab_shape(self, src: _Map, thickness: int, channels: int | None = None) -> tuple[int, ...]:
        shape = [src.channels if channels is None else channels, *src.shape]
        shape[self.axis + 1] = thickness
        return tuple(shape)

    def _pointwise(self, conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        """A 1x1x1 convolution as one matrix product (no im2col copy of the input)."""
        w, bias = self._weight(conv, x.device)
        flat = x.reshape(x.shape[0], -1)
        y = torch.mm(w.view(w.shape[0], w.shape[1]), flat)
        if bias is not None:
            y += bias[:, None]
        return y.view(w.shape[0], *x.shape[1:])

    def _conv_padding(self, conv: nn.Conv3d) -> tuple[int, int, int]:
        h = conv.kernel_size[0] // 2
        return tuple(0 if d == self.axis else h for d in range(3))  # type: ignore[return-value]

    def _conv_pass(
        self,
        src: _Map,
        conv: nn.Conv3d,
        norm: nn.GroupNorm | None,
        silu: bool,
        bar,
        into: _Map | None = None,
        out: torch.Tensor | None = None,
        shortcut: nn.Conv3d | None = None,
        keep_src: bool = False,
        stats: bool = True,
    ) -> tuple[_Map, _Map | None]:
        """``conv(silu(norm(src)))`` slab by slab, added to ``into``'s slabs or written into ``out``;
        with ``shortcut`` also the 1x1 ``shortcut(src)`` as a second map."""
        h = conv.kernel_size[0] // 2
        n = len(src.bounds)
        dst = into or _Map(conv.out_channels, src.shape, self.axis, src.bounds, self.ledger)
        if stats:
            dst.stats = _Stats(n)
        side = _Map(shortcut.out_channels, src.shape, self.axis, src.bounds, self.ledger) if shortcut is not None else None
        affine = src.stats.group_affine(norm) if norm is not None else None  # type: ignore[union-attr]
        early = len(self.devices) == 1 and not keep_src
        shape = (-1,) + (1,) * 3

        def job(i: int, device: torch.device) -> int:
            a, b = src.bounds[i]
            if h == 0:  # a 1x1 convolution needs no halo and no padding
                x = src.gather(a, b, device)
                if affine is not None:
                    x = torch.addcmul(*(t.to(device).view(shape) for t in reversed(affine)), x)
                    if silu:
                        F.silu(x, inplace=True)
                elif silu:
                    x = F.silu(x)
                y = self._pointwise(conv, x)
            else:
                # One buffer holds the (normalised, activated) input with its halo and the zeros at the volume's borders.
                lo, hi = max(a - h, 0), min(b + h, src.length)
                buf = torch.empty(self._slab_shape(src, (b + h) - (a - h)), device=device)
                dim = self.axis + 1
                if lo > a - h:
                    buf.narrow(dim, 0, lo - (a - h)).zero_()
                if hi < b + h:
                    buf.narrow(dim, hi - (a - h), (b + h) - hi).zero_()
                src.fill(buf.narrow(dim, lo - (a - h), hi - lo), lo, None if affine is None else tuple(t.to(device).view(shape) for t in affine))
                if early:
                    src.release_below(b - h)  # the halo is in the buffer; later slabs read from b - h on
                if side is not None:  # the 1x1 shortcut of the block's input slab
                    side.put(i, self._store(self._pointwise(shortcut, src.gather(a, b, device))))  # type: ignore[arg-type]
                if silu:
                    F.silu(buf, inplace=True)  # silu(0) = 0: the zero padding stays zero
                w, bias = self._weight(conv, device)
                y = F.conv3d(buf[None], w, bias, padding=self._conv_padding(conv))[0]
                del buf
            if into is not None:
                y += into.slabs[i].to(device=device, dtype=torch.float32)  # type: ignore[union-attr]
            if stats:
                dst.stats.add(i, y)  # type: ignore[union-attr]
            if out is not None:
                out.narrow(self.axis + 1, a, b - a).copy_(y)
            else:
                dst.put(i, self._store(y))
            return b - h  # where the next slab's input starts

        self._run(n, job, src, keep_src, bar)
        return dst, side

    def _up_pass(self, src: _Map, conv: nn.Conv3d, bounds: list[tuple[int, int]], bar) -> _Map:
        """MONAI's upsampling (trilinear x2, then a convolution) for output slabs ``bounds``: each slab
        interpolates the low-resolution slices it needs plus one on each side, which makes
        ``F.interpolate`` exact at the slab borders (its edge clamping only acts at the volume's edges)."""
        h = conv.kernel_size[0] // 2
        length = src.length
        shape = tuple(2 * s for s in src.shape)
        dst = _Map(conv.out_channels, shape, self.axis, bounds, self.ledger)
        dst.stats = _Stats(len(bounds))
        dim = self.axis + 1
        early = len(self.devices) == 1

        def job(i: int, device: torch.device) -> int:
            a, b = bounds[i]
            olo, ohi = max(a - h, 0), min(b + h, 2 * length)  # interpolated slices the convolution reads
            lo, hi = max((olo - 1) // 2, 0), min((ohi - 2) // 2 + 2, length)  # low-resolution slices they need
            x = src.gather(lo, hi, device)
            next_lo = max((b - h - 1) // 2, 0)  # the first low-resolution slice the next slab reads
            if early:
                src.release_below(next_lo)
            x = F.interpolate(x[None], scale_factor=2.0, mode="trilinear")[0]
            buf = torch.empty(self._slab_shape(dst, (b + h) - (a - h), src.channels), device=device)
            if olo > a - h:
                buf.narrow(dim, 0, olo - (a - h)).zero_()
            if ohi < b + h:
                buf.narrow(dim, ohi - (a - h), (b + h) - ohi).zero_()
            buf.narrow(dim, olo - (a - h), ohi - olo).copy_(x.narrow(dim, olo - 2 * lo, ohi - olo))
            del x
            w, bias = self._weight(conv, device)
            y = F.conv3d(buf[None], w, bias, padding=self._conv_padding(conv))[0]
            del buf
            dst.stats.add(i, y)  # type: ignore[union-attr]
            dst.put(i, self._store(y))
            return next_lo

        self._run(len(bounds), job, src, False, bar)
        return dst

    def level_bounds(self, latent_shape: Sequence[int], latent_channels: int) -> list[list[tuple[int, int]]]:
        """Slab bounds at each resolution level (latent first). A slab is ``slab * 2**level`` voxels thick,
        or thicker where a thin slab would hold less than :attr:`min_slab_bytes` of the level's widest map
        (thin slabs of narrow maps make the convolutions inefficient and save little memory)."""
        channels = [latent_channels]
        for kind, spec in self.plan:
            if kind == "up":
                channels.append(spec.out_channels)
            convs = [spec] if kind == "up" else [spec[0]] if kind == "conv" else [spec[1], spec[3]]
            channels[-1] = max(channels[-1], *(c.in_channels for c in convs), *(c.out_channels for c in convs))
        out = []
        for level, c in enumerate(channels):
            shape = [n * 2**level for n in latent_shape]
            plane = math.prod(shape) // shape[self.axis]
            thick = max(self.slab * 2**level, -(-self.min_slab_bytes // (c * plane * 4)))
            out.append(split_bounds(shape[self.axis], min(thick, shape[self.axis])))
        return out

    # ---- public

    def n_slab_jobs(self, levels: list[list[tuple[int, int]]]) -> int:
        """How many slab computations a decode runs (the progress bar's total)."""
        total, level = 0, 0
        for kind, _ in self.plan:
            level += kind == "up"
            total += len(levels[level]) * (2 if kind == "res" else 1)
        return total

    @torch.no_grad()
    def decode(self, z: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode a ``(1, C, x, y, z)`` latent (already divided by the scale factor) to a ``(1, 1, 4x, 4y, 4z)``
        float32 volume on the storage device (or into ``out``, preallocated with that shape)."""
        if z.ndim != 5 or z.shape[0] != 1:
            raise ValueError(f"expected a (1, C, x, y, z) latent, got shape {tuple(z.shape)}")
        shape = tuple(int(s) for s in z.shape[2:])
        levels = self.level_bounds(shape, int(z.shape[1]))
        bounds = levels[0]
        self.ledger = _Ledger()
        src = _Map(int(z.shape[1]), shape, self.axis, bounds, self.ledger)
        for i, (a, b) in enumerate(bounds):
            src.put(i, self._store(z[0].narrow(self.axis + 1, a, b - a).contiguous()))
        out_ch = self.plan[-1][1][0].out_channels
        up = 2 ** sum(kind == "up" for kind, _ in self.plan)
        out_shape = (1, out_ch, *(up * s for s in shape))
        if out is None:
            out = torch.empty(out_shape, dtype=torch.float32, device=self.storage)
        elif tuple(out.shape) != out_shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {out_shape}")
        bar = _bar(self.progress, self.n_slab_jobs(levels))
        try:
            x = src
            level = 0
            last = len(self.plan) - 1
            for k, (kind, spec) in enumerate(self.plan):
                if kind == "conv":
                    conv, norm = spec
                    x, _ = self._conv_pass(x, conv, norm, False, bar, out=out[0] if k == last else None, stats=k != last)
                elif kind == "up":
                    level += 1
                    x = self._up_pass(x, spec, levels[level], bar)
                else:
                    norm1, conv1, norm2, conv2, shortcut = spec
                    h1, side = self._conv_pass(x, conv1, norm1, True, bar, shortcut=shortcut, keep_src=shortcut is None)
                    x, _ = self._conv_pass(h1, conv2, norm2, True, bar, into=side if side is not None else x)
        finally:
            if bar is not None:
                bar.close()
        return out


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="TSP decode", unit="slab", mininterval=1.0, leave=False)


@contextlib.contextmanager
def _monai_splits(autoencoder: nn.Module, num_splits: int, dim_split: int) -> Iterator[None]:
    """Set MONAI's ``num_splits``/``dim_split`` on every ``MaisiConvolution`` for the duration."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiConvolution

    convs = [m for m in autoencoder.modules() if isinstance(m, MaisiConvolution)]
    saved = [(m.num_splits, m.dim_split) for m in convs]
    for m in convs:
        m.num_splits, m.dim_split = num_splits, dim_split
    try:
        yield
    finally:
        for m, (n, d) in zip(convs, saved, strict=True):
            m.num_splits, m.dim_split = n, d


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()


def _norms(autoencoder: nn.Module, device: torch.device):
    from maisi.models.networks import float32_norms

    return contextlib.nullcontext() if device.type == "cuda" else float32_norms(autoencoder)


@torch.no_grad()
def monai_decode(autoencoder: nn.Module, z: torch.Tensor, num_splits: int = 1, dim_split: int = 1) -> torch.Tensor:
    """MONAI's ``decode_stage_2_outputs`` with ``num_splits`` segments along ``dim_split`` (1 = unsplit);
    float16 autocast on CUDA (as MAISI runs it), float32 on the CPU."""
    with _monai_splits(autoencoder, num_splits, dim_split), _autocast(z.device), _norms(autoencoder, z.device):
        return autoencoder.decode_stage_2_outputs(z).float()


@torch.no_grad()
def sliding_window_decode(
    autoencoder: nn.Module, z: torch.Tensor, roi: Sequence[int], overlap: float = 0.25, device: torch.device | None = None
) -> torch.Tensor:
    """MONAI's sliding-window inference over latent windows of ``roi`` (Gaussian blending). Faster than
    nothing when memory is short, but not exact: each window has its own group-norm statistics."""
    from monai.inferers import sliding_window_inference

    device = device or z.device
    roi = [min(int(r), int(n)) for r, n in zip(roi, z.shape[2:], strict=True)]
    with _monai_splits(autoencoder, 1, 1), _autocast(device), _norms(autoencoder, device):
        out = sliding_window_inference(
            z, roi, 1, lambda w: autoencoder.decode_stage_2_outputs(w).float(), overlap=overlap, mode="gaussian",
            sw_device=device, device=z.device,
        )  # fmt: skip
    return torch.as_tensor(out).float()


def decode_latent(autoencoder: nn.Module, z: torch.Tensor, settings: DecodeSettings, progress: bool = False) -> torch.Tensor:
    """Decode ``z`` (``(1, C, x, y, z)``, already divided by the scale factor) as ``settings`` says;
    returns a float32 ``(1, 1, X, Y, Z)`` tensor on the CPU."""
    devices = settings.compute_devices()
    if settings.method == "tsp":
        storage = devices[0] if settings.storage == "device" else torch.device("cpu")
        engine = TSPDecoder(
            autoencoder, devices, axis=settings.axis, slab=settings.slab, storage=storage,
            storage_dtype=_DTYPES[settings.storage_dtype], progress=progress,
        )  # fmt: skip
        return engine.decode(z).cpu()
    autoencoder = autoencoder.to(devices[0])
    z = z.to(devices[0])
    if settings.method == "monai":
        return monai_decode(autoencoder, z, settings.num_splits, settings.dim_split).cpu()
    return sliding_window_decode(autoencoder, z, settings.roi, settings.overlap, devices[0]).cpu()
