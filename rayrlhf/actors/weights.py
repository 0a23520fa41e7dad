"""Weight-sync primitives shared by the trainer (sender) and the rollout workers (receivers).

A sync moves the policy's full weights under their checkpoint names (`rayrlhf.models.hf_layout`),
in buckets of about `bucket_bytes`. Each bucket is a list of (name, numpy array) pairs; yielding
it from a Ray streaming generator stores it once in the object store, and every worker reads it
zero-copy. Checksums are computed on both sides over the same bytes, piece by piece: an engine
reports {(name, region): checksum} for the slices it holds (a tensor-parallel rank holds a
slice), the trainer hashes the same slices of its full tensors, and `compare_checksums` also
checks that every tensor of the trainer is held whole by the engine's pieces together.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator

import numpy as np
import torch

Bucket = list[tuple[str, np.ndarray]]
Region = tuple[tuple[int, int], ...]  # one [start, stop) per dimension of the full tensor
DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU numpy view of `tensor` (bfloat16 travels as its raw 16-bit pattern)."""
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def from_numpy(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `to_numpy`; shares memory with `array` (a read-only array stays read-only: do not write)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only zero-copy arrays from the object store
        tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def tensor_checksum(tensor: torch.Tensor) -> str:
    """Exact fingerprint of a tensor's dtype, shape and bytes (-0.0 counts as +0.0).

    Zeros are made positive on both sides because a weight read back through a CPU kernel
    (`vllm_layout.kernel_weight`) cannot tell -0.0 from +0.0; the two behave the same in a
    matrix product.
    """
    tensor = tensor.detach().to("cpu")
    if tensor.is_floating_point():
        tensor = tensor + 0.0
    tensor = tensor.contiguous()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    raw = tensor.view(torch.uint8) if tensor.numel() else tensor
    digest.update(raw.numpy().tobytes() if raw.numel() else b"")
    return digest.hexdigest()


def bucketize(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[Bucket]:
    """Group (name, tensor) pairs into buckets of about `bucket_bytes`, as numpy arrays."""
    bucket: Bucket = []
    size = 0
    for name, tensor in named:
        array = to_numpy(tensor)
        if bucket and size + array.nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, array))
        size += array.nbytes
    if bucket:
        yield bucket


def full_region(shape: Iterable[int]) -> Region:
    """The region of a whole tensor of `shape`."""
    return tuple((0, int(n)) for n in shape)


def region_slice(tensor: torch.Tensor, region: Region) -> torch.Tensor:
    """The part of `tensor` a region names; a region outside the tensor is a ValueError."""
    if len(region) != tensor.dim() or any(not 0 <= a <= b <= n for (a, b), n in zip(region, tensor.shape, strict=True)):
        raise ValueError(f"region {region} does not fit a tensor of shape {tuple(tensor.shape)}")
    return tensor[tuple(slice(a, b) for a, b in region)]


def covers(regions: Iterable[Region], shape: tuple[int, ...]) -> bool:
    """Whether the union of `regions` is the whole of a tensor of `shape` (exact, on compressed cells)."""
    regions = [r for r in regions if len(r) == len(shape)]
    if not regions:
        return torch.Size(shape).numel() == 0
    cuts = [sorted({0, n, *(p for r in regions for p in r[d])}) for d, n in enumerate(shape)]
    cells = [list(zip(c[:-1], c[1:], strict=True)) for c in cuts]
    for cell in itertools.product(*cells):
        if not any(all(a <= lo and hi <= b for (lo, hi), (a, b) in zip(cell, r, strict=True)) for r in regions):
            return False
    return True


def whole_checksums(sums: dict[tuple[str, Region], str]) -> dict[str, str]:
    """{name: checksum} of the whole-tensor entries of a {(name, region): checksum} report."""
    return {name: value for (name, region), value in sums.items() if all(a == 0 for a, _ in region)}


def show(name: str, region: Region, shape: tuple[int, ...] | None = None) -> str:
    """`name` with its region, e.g. `lm_head.weight[0:50, 0:64]` (the name alone for a whole tensor)."""
    if shape is not None and region == tuple((0, n) for n in shape):
        return name
    return f"{name}[{', '.join(f'{a}:{b}' for a, b in region)}]"


def compare_checksums(
    expected: dict[tuple[str, Region], str], shapes: dict[str, tuple[int, ...]], aliases: dict[str, str],
    actual: dict[tuple[str, Region], str],
) -> list[str]:
    """What is wrong with one engine's `actual` checksums, one line per tensor (empty: it matches).

    `expected` holds the trainer's checksum of every (name, region) the engine reported;
    `shapes` every checkpoint tensor of the trainer; `aliases` its tied names, which an engine
    may not hold separately (they are then verified through the tensor they share).
    """
    problems, held = [], {}
    for (name, region), value in sorted(actual.items()):
        held.setdefault(name, []).append(region)
        if name not in shapes:
            problems.append(f"{show(name, region)}: held by the engine, unknown to the trainer")
        elif expected.get((name, region)) != value:
            problems.append(f"{show(name, region, shapes[name])}: differs from the trainer")
    for name, shape in shapes.items():
        if name in held and not covers(held[name], shape):
            problems.append(f"{name}: only partly held by the engine ({len(held[name])} piece(s))")
        elif name not in held and not (name in aliases and aliases[name] in held):
            problems.append(f"{name}: missing from the engine")
    return problems


def bucket_checksums(buckets: Iterable[Bucket], meta: list[tuple[str, tuple[int, ...], torch.dtype]],
                     aliases: dict[str, str], keys: Iterable[tuple[str, Region]]) -> dict[tuple[str, Region], str]:
    """The checksums `keys` name, computed from buckets of a sync (what the trainer held then), tied aliases
    through the tensor they share: the expected side of a verification when the trainer has moved on."""
    dtypes = {name: dtype for name, _, dtype in meta}
    arrays = {name: array for bucket in buckets for name, array in bucket}
    out = {}
    for name, region in keys:
        region = tuple(tuple(r) for r in region)
        canonical = aliases.get(name, name)
        if canonical not in arrays:
            out[(name, region)] = "not in the kept buckets"
            continue
        tensor = from_numpy(arrays[canonical], dtypes.get(canonical, torch.float32))
        try:
            out[(name, region)] = tensor_checksum(region_slice(tensor, region))
        except ValueError as exc:
            out[(name, region)] = f"no such region: {exc}"
    return out
