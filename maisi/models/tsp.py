"""Tensor-splitting-parallel (TSP) streaming of the MAISI autoencoder: exact, slab by slab, memory-lean.

MAISI decodes 512x512x768 volumes by splitting the autoencoder's feature maps into overlapping
segments. MONAI's implementation (``num_splits``/``dim_split`` in ``MaisiConvolution``) splits
every convolution's input, runs the pieces and concatenates them again, and its group norms work
on the whole map; on a CPU it saves almost no memory, because every layer still materialises its
full input and output (and the concatenation copies them once more). Its ``encode`` has no
splitting at all: memory grows with the volume.

:class:`TSPDecoder` and :class:`TSPEncoder` run the same networks (they read the weights of an
``AutoencoderKlMaisi``) as a stream of slabs along one spatial axis:

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
  halo, which reproduces ``F.interpolate`` exactly; downsampling (MONAI's one-voxel zero pad at
  the far side, then a stride-2 convolution) reads one voxel beyond its slab;
- the decoder's last convolution writes each slab straight into the preallocated output volume.

Storing every map, a residual block holds two full-size maps (its input, kept for the skip
connection, and its inner map, whose group norm needs all of it). The encoder, whose first-level maps
are the largest (64 channels at full resolution), avoids that twice over: the first convolution's
output is never stored but recomputed per slab from the image where it is read (one input channel:
a few percent of a full convolution), and with ``max_stored_maps`` a block's inner map is stored only
while the stored maps fit in that many largest maps; its other slabs are recomputed, in order, from
the block's input while the second convolution streams (each exactly once: the input slabs they read
are overwritten by the block's output only after that).

Slabs can be spread over several devices (one worker thread per device), and the full-size maps
can live in host memory (optionally as float16/bfloat16) while slabs stream through the GPUs.
With float32 storage the result equals MONAI's unsplit decode or encode up to float32 rounding.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TSPDecoder", "TSPEncoder", "prompt_host_release", "split_bounds"]

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
        #: Computes a slab that is not stored (``maker(index)``, already on the storage device): such a map
        #: holds only the slabs it was given and those computed on demand, until they are released.
        self.maker: Callable[[int], torch.Tensor] | None = None

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
        """``(start, view)`` of the slices in ``[lo, hi)``, slab by slab (a slab not held is made by :attr:`maker`)."""
        dim = self.axis + 1
        for i, (a, b) in enumerate(self.bounds):
            if b <= lo or a >= hi:
                continue
            slab = self.slabs[i]
            if slab is None:
                if self.maker is None:
                    raise RuntimeError(f"slab [{a}, {b}) was already released")
                slab = self.maker(i)
                self.put(i, slab)
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


def _conv3d(module: nn.Module, stride: int = 1, padding: int | None = None) -> nn.Conv3d:
    """The ``nn.Conv3d`` inside a MONAI convolution wrapper; only odd, cubic, undilated kernels with the given
    stride and padding (default: 'same') stream."""
    conv = module if isinstance(module, nn.Conv3d) else next((m for m in module.modules() if isinstance(m, nn.Conv3d)), None)
    if conv is None:
        raise TypeError(f"{type(module).__name__} holds no Conv3d (transposed convolutions are not supported)")
    k = conv.kernel_size
    if conv.stride != (stride,) * 3 or conv.dilation != (1, 1, 1) or conv.groups != 1 or len(set(k)) != 1 or k[0] % 2 == 0:
        raise TypeError(f"unsupported convolution for slab streaming: {conv}")
    if conv.padding != ((k[0] // 2) if padding is None else padding,) * 3:
        raise TypeError(f"unexpected padding in {conv}")
    return conv


def _steps(blocks: Sequence[nn.Module], where: str) -> list[tuple[str, Any]]:
    """The streamable steps of an encoder's or decoder's ``blocks``: ``("conv", (conv, norm or None))``,
    ``("res", (norm1, conv1, norm2, conv2, shortcut or None))``, ``("up", conv)`` and ``("down", conv)``."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import (
        MaisiConvolution,
        MaisiDownsample,
        MaisiGroupNorm3D,
        MaisiResBlock,
        MaisiUpsample,
    )

    steps: list[tuple[str, Any]] = []
    pending: nn.GroupNorm | None = None
    for block in blocks:
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
        elif isinstance(block, MaisiDownsample) and pending is None and tuple(block.pad) == (0, 1) * 3:
            steps.append(("down", _conv3d(block.conv, stride=2, padding=0)))
        else:
            raise TypeError(
                f"the TSP {where} cannot stream {type(block).__name__} (attention blocks and transposed "
                "convolutions need the whole map)"
            )
    if pending is not None:
        raise TypeError(f"the {where} ends with a group norm")
    return steps


class _SlabEngine:
    """The slab machinery the decoder and the encoder share (see the module doc); subclasses give the plan."""

    #: What the engine streams, for messages and the progress bar.
    WHAT = "TSP"

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
        max_stored_maps: float | None = None,
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
        self.ledger = _Ledger()  # bytes of stored feature maps during the last run (``ledger.peak``)
        if max_stored_maps is not None and max_stored_maps < 1:
            raise ValueError(f"max_stored_maps must be at least 1 (one map of the largest size), got {max_stored_maps}")
        self.max_stored_maps = max_stored_maps
        self.budget: int | None = None  # bytes the stored maps may take in this run (from max_stored_maps)

    @staticmethod
    def _plan(autoencoder: nn.Module) -> list[tuple[str, Any]]:
        raise NotImplementedError

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
                if src is not None and (not keep_src or src.maker is not None):
                    src.release_below(lows[-1])
                if bar is not None:
                    bar.update(len(idx))
        finally:
            if pool is not None:
                pool.shutdown()
        if src is not None and (not keep_src or src.maker is not None):
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

    def _conv_slab(
        self, src: _Map, conv: nn.Conv3d, affine: tuple[torch.Tensor, torch.Tensor] | None, silu: bool, i: int,
        device: torch.device, release: bool, then: Callable[[], None] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """``conv(silu(norm(src)))`` of slab ``i`` (``affine``: the norm's per-channel scale and shift); with
        ``release``, frees the input slabs that later slabs do not read once the halo is in the buffer, and
        calls ``then`` after that (before the convolution: the freed memory is reused)."""
        h = conv.kernel_size[0] // 2
        a, b = src.bounds[i]
        shape = (-1,) + (1,) * 3
        if h == 0:  # a 1x1 convolution needs no halo and no padding
            x = src.gather(a, b, device)
            if affine is not None:
                x = torch.addcmul(*(t.to(device).view(shape) for t in reversed(affine)), x)
                if silu:
                    F.silu(x, inplace=True)
            elif silu:
                x = F.silu(x)
            if then is not None:
                then()
            return self._pointwise(conv, x)
        # One buffer holds the (normalised, activated) input with its halo and the zeros at the volume's borders.
        lo, hi = max(a - h, 0), min(b + h, src.length)
        buf = torch.empty(self._slab_shape(src, (b + h) - (a - h)), device=device)
        dim = self.axis + 1
        if lo > a - h:
            buf.narrow(dim, 0, lo - (a - h)).zero_()
        if hi < b + h:
            buf.narrow(dim, hi - (a - h), (b + h) - hi).zero_()
        scaled = None if affine is None else tuple(t.to(device).view(shape) for t in affine)
        src.fill(buf.narrow(dim, lo - (a - h), hi - lo), lo, scaled)  # type: ignore[arg-type]
        if release:
            src.release_below(b - h)  # later slabs read from b - h on
        if then is not None:
            then()
        if silu:
            F.silu(buf, inplace=True)  # silu(0) = 0: the zero padding stays zero
        w, bias = self._weight(conv, device)
        return F.conv3d(buf[None], w, bias, padding=self._conv_padding(conv))[0]

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
        keep: str = "all",
    ) -> tuple[_Map, _Map | None]:
        """``conv(silu(norm(src)))`` slab by slab, plus ``into``'s slabs (written in place when ``into`` is
        stored), or written into ``out``; with ``shortcut`` also the 1x1 ``shortcut(src)`` as a second map.

        ``keep`` says which output slabs are stored: ``all``; ``none`` (only the statistics are gathered,
        and slabs are recomputed from ``src`` when read, so ``src`` must stay unchanged while the result
        is used); ``budget`` (stored while the stored maps stay within :attr:`budget` bytes, the others
        recomputed). The last two need one compute device (a recomputed slab is made where it is read).
        """
        n = len(src.bounds)
        if into is not None and into.maker is None:
            dst = into
        else:
            dst = _Map(conv.out_channels, src.shape, self.axis, src.bounds, self.ledger)
        if stats:
            dst.stats = _Stats(n)
        side = _Map(shortcut.out_channels, src.shape, self.axis, src.bounds, self.ledger) if shortcut is not None else None
        affine = src.stats.group_affine(norm) if norm is not None else None  # type: ignore[union-attr]
        single = len(self.devices) == 1
        early = single and (not keep_src or src.maker is not None)
        if keep != "all" and out is None and into is None and single and (keep == "none" or self.budget is not None):
            budget = 0 if keep == "none" else self.budget
            dst.maker = lambda i: self._store(self._conv_slab(src, conv, affine, silu, i, self.devices[0], False))
        else:
            budget = None
        h = conv.kernel_size[0] // 2

        def job(i: int, device: torch.device) -> int:
            a, b = src.bounds[i]

            def shortcut_slab() -> None:  # the 1x1 shortcut of the block's input slab
                side.put(i, self._store(self._pointwise(shortcut, src.gather(a, b, device))))  # type: ignore[union-attr, arg-type]

            y = self._conv_slab(src, conv, affine, silu, i, device, early, shortcut_slab if side is not None else None)
            if into is not None:
                y += into.gather(a, b, device)
                if into.maker is not None:
                    into.release_below(b)
            if stats:
                dst.stats.add(i, y)  # type: ignore[union-attr]
            if out is not None:
                out.narrow(self.axis + 1, a, b - a).copy_(y)
            elif budget is None or self.ledger.current + y.numel() * self.storage_dtype.itemsize <= budget:
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

    def _down_pass(self, src: _Map, conv: nn.Conv3d, bounds: list[tuple[int, int]], bar) -> _Map:
        """MONAI's downsampling (one zero voxel padded at the far side of every axis, then a stride-2
        convolution without padding) for output slabs ``bounds``: slab ``[a, b)`` reads input ``[2a, 2b + 1)``."""
        length = src.length
        dst = _Map(conv.out_channels, tuple(s // 2 for s in src.shape), self.axis, bounds, self.ledger)
        dst.stats = _Stats(len(bounds))
        early = len(self.devices) == 1

        def job(i: int, device: torch.device) -> int:
            a, b = bounds[i]
            hi = min(2 * b + 1, length)
            x = src.gather(2 * a, hi, device)
            if early:
                src.release_below(2 * b)
            pad = [0, 1] * 3  # F.pad lists the last axis first
            pad[2 * (2 - self.axis) + 1] = 2 * b + 1 - hi
            x = F.pad(x, pad)
            w, bias = self._weight(conv, device)
            y = F.conv3d(x[None], w, bias, stride=2)[0]
            del x
            dst.stats.add(i, y)  # type: ignore[union-attr]
            dst.put(i, self._store(y))
            return 2 * b

        self._run(len(bounds), job, src, False, bar)
        return dst

    def _stream(self, x: _Map, levels: list[list[tuple[int, int]]], out: torch.Tensor, bar, lazy_first: bool = False) -> None:
        """Run the plan on ``x``; the last convolution writes into ``out`` (``(C, ...)``, preallocated). With
        ``lazy_first`` the first convolution's output is not stored but recomputed from ``x`` where it is read
        (worth it when ``x`` has few channels, as an image has); residual blocks store their inner map within
        :attr:`budget` and recompute the rest."""
        level = 0
        last = len(self.plan) - 1
        for k, (kind, spec) in enumerate(self.plan):
            if kind == "conv":
                conv, norm = spec
                lazy = lazy_first and k == 0 and k != last
                x, _ = self._conv_pass(
                    x, conv, norm, False, bar, out=out if k == last else None, stats=k != last, keep_src=lazy,
                    keep="none" if lazy else "all",
                )  # fmt: skip
            elif kind in ("up", "down"):
                level += 1
                x = (self._up_pass if kind == "up" else self._down_pass)(x, spec, levels[level], bar)
            else:
                norm1, conv1, norm2, conv2, shortcut = spec
                h1, side = self._conv_pass(
                    x, conv1, norm1, True, bar, shortcut=shortcut, keep_src=shortcut is None,
                    keep="budget" if shortcut is None else "all",
                )  # fmt: skip
                x, _ = self._conv_pass(h1, conv2, norm2, True, bar, into=side if side is not None else x)

    def _levels(self, shape: Sequence[int], channels: int) -> tuple[list[int], list[tuple[int, ...]]]:
        """The widest map's channels and the spatial shape at each resolution level (the input's first)."""
        widths = [int(channels)]
        shapes = [tuple(int(n) for n in shape)]
        for kind, spec in self.plan:
            if kind in ("up", "down"):
                widths.append(spec.out_channels)
                shapes.append(tuple(n * 2 if kind == "up" else n // 2 for n in shapes[-1]))
            convs = [spec] if kind in ("up", "down") else [spec[0]] if kind == "conv" else [spec[1], spec[3]]
            widths[-1] = max(widths[-1], *(c.in_channels for c in convs), *(c.out_channels for c in convs))
        return widths, shapes

    def level_bounds(self, shape: Sequence[int], channels: int) -> list[list[tuple[int, int]]]:
        """Slab bounds at each resolution level (the input's first). A slab is ``slab`` voxels thick at the
        coarsest level, and as thick in physical size at the finer ones, or thicker where a thin slab would
        hold less than :attr:`min_slab_bytes` of the level's widest map (thin slabs of narrow maps make the
        convolutions inefficient and save little memory)."""
        widths, shapes = self._levels(shape, channels)
        coarsest = min(s[self.axis] for s in shapes)
        out = []
        for c, level_shape in zip(widths, shapes, strict=True):
            length = level_shape[self.axis]
            plane = math.prod(level_shape) // length
            thick = max(self.slab * (length // coarsest), -(-self.min_slab_bytes // (c * plane * 4)))
            out.append(split_bounds(length, min(thick, length)))
        return out

    def n_slab_jobs(self, levels: list[list[tuple[int, int]]]) -> int:
        """How many slab computations a run makes (the progress bar's total)."""
        total, level = 0, 0
        for kind, _ in self.plan:
            level += kind in ("up", "down")
            total += len(levels[level]) * (2 if kind == "res" else 1)
        return total

    def _input_map(self, x: torch.Tensor, what: str) -> tuple[_Map, list[list[tuple[int, int]]]]:
        """``x`` (``(1, C, ...)``) as the first level's slabs on the storage device, and every level's bounds."""
        if x.ndim != 5 or x.shape[0] != 1:
            raise ValueError(f"expected a (1, C, x, y, z) {what}, got shape {tuple(x.shape)}")
        shape = tuple(int(s) for s in x.shape[2:])
        levels = self.level_bounds(shape, int(x.shape[1]))
        widths, shapes = self._levels(shape, int(x.shape[1]))
        largest = max(c * math.prod(s) for c, s in zip(widths, shapes, strict=True)) * self.storage_dtype.itemsize
        self.budget = None if self.max_stored_maps is None else int(self.max_stored_maps * largest)
        self.ledger = _Ledger()
        src = _Map(int(x.shape[1]), shape, self.axis, levels[0], self.ledger)
        for i, (a, b) in enumerate(levels[0]):
            src.put(i, self._store(x[0].narrow(self.axis + 1, a, b - a).contiguous()))
        return src, levels

    def _output_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        factor = 2.0 ** sum((kind == "up") - (kind == "down") for kind, _ in self.plan)
        return (1, self.plan[-1][1][0].out_channels, *(int(n * factor) for n in shape))


class TSPDecoder(_SlabEngine):
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

    WHAT = "TSP decode"

    @staticmethod
    def _plan(autoencoder: nn.Module) -> list[tuple[str, Any]]:
        return [("conv", (_conv3d(autoencoder.post_quant_conv), None)), *_steps(autoencoder.decoder.blocks, "decoder")]

    @torch.no_grad()
    def decode(self, z: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode a ``(1, C, x, y, z)`` latent (already divided by the scale factor) to a ``(1, 1, 4x, 4y, 4z)``
        float32 volume on the storage device (or into ``out``, preallocated with that shape)."""
        src, levels = self._input_map(z, "latent")
        out_shape = self._output_shape(src.shape)
        if out is None:
            out = torch.empty(out_shape, dtype=torch.float32, device=self.storage)
        elif tuple(out.shape) != out_shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {out_shape}")
        bar = _bar(self.progress, self.n_slab_jobs(levels), self.WHAT)
        try:
            self._stream(src, levels, out[0], bar)
        finally:
            if bar is not None:
                bar.close()
        return out


class TSPEncoder(_SlabEngine):
    """Slab-streamed encoding with the weights of a MONAI ``AutoencoderKlMaisi``: ``(mu, sigma)`` equal to
    ``autoencoder.encode`` on the whole volume (group norms over the whole volume), with memory near the
    size of the largest feature map. Arguments as :class:`TSPDecoder`'s (``slab`` in latent voxels)."""

    WHAT = "TSP encode"

    def __init__(self, autoencoder: nn.Module, *args: Any, **kwargs: Any):
        super().__init__(autoencoder, *args, **kwargs)
        self._quant = (_conv3d(autoencoder.quant_conv_mu), _conv3d(autoencoder.quant_conv_log_sigma))

    @staticmethod
    def _plan(autoencoder: nn.Module) -> list[tuple[str, Any]]:
        return _steps(autoencoder.encoder.blocks, "encoder")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, sigma)`` of a ``(1, C, X, Y, Z)`` image, each float32 ``(1, latent channels, X/4, Y/4, Z/4)``
        on the first compute device; ``sigma`` is ``exp(clamp(log_var, -30, 20) / 2)``, as MONAI computes it."""
        src, levels = self._input_map(x, "image")
        factor = 2 ** sum(kind == "down" for kind, _ in self.plan)
        if any(n % factor for n in src.shape):
            raise ValueError(f"image size {src.shape} is not a multiple of {factor} along every axis")
        h = torch.empty(self._output_shape(src.shape)[1:], dtype=torch.float32, device=self.devices[0])
        bar = _bar(self.progress, self.n_slab_jobs(levels), self.WHAT)
        try:
            self._stream(src, levels, h, bar, lazy_first=True)
        finally:
            if bar is not None:
                bar.close()
        mu = self._pointwise(self._quant[0], h)
        log_var = self._pointwise(self._quant[1], h).clamp_(-30.0, 20.0)
        return mu[None], torch.exp(log_var / 2)[None]


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="slab", mininterval=1.0, leave=False)
