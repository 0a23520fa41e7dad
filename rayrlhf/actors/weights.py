"""Weight-sync primitives shared by the trainer (sender) and the rollout workers (receivers).

A sync moves the policy's full weights under their Hugging Face names, in buckets of about
`bucket_bytes`. Each bucket is a list of (name, numpy array) pairs; yielding it from a Ray
streaming generator stores it once in the object store, and every worker reads it zero-copy.
Checksums are computed on both sides over the same bytes, so equality proves that a worker
holds exactly the trainer's weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import numpy as np
import torch

Bucket = list[tuple[str, np.ndarray]]
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
    """Exact fingerprint of a tensor's dtype, shape and bytes."""
    tensor = tensor.detach().to("cpu").contiguous()
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


def checksum_mismatches(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Names whose checksums differ or that exist on one side only (empty: identical)."""
    names = sorted(set(expected) | set(actual))
    return [n for n in names if expected.get(n) != actual.get(n)]
