"""One KV store block on disk: its key, its bytes, and how it is written.

Owns the key scheme, encoding and validating a block file, and the atomic write.
Knows nothing of capacity, LRU or faults policy (fleet/kv_store.py). Never
guesses: anything that does not match the expected `BlockSpec` and key exactly is
a `BlockFormatError` with a short reason, which the store turns into a miss.

Keys: key_i = sha256(KEY_TAG, model_id, namespace, key_{i-1}, the block_tokens token
ids of block i as int64 little-endian), each field prefixed by its length (8 bytes LE)
so no two field splits hash alike; key_{-1} = "". Lowercase hex. Only FULL blocks
get keys: 150 tokens at 64 per block -> 2 keys, 22 tokens are always recomputed.

Layout (integers little-endian):

    offset  size        field
    0       4           magic b"EPKV"
    4       2           format version (FORMAT_VERSION)
    6       2           reserved, 0
    8       4           meta_len: length of the JSON meta that follows
    12      meta_len    JSON meta, utf-8, space-padded so the payload starts on a
                        64-byte boundary (aligned torch.frombuffer views):
                        {"model_id", "dtype", "shape", "byteorder", "key",
                         "payload_bytes", "xxh3_128", "index_dim"}
    12+meta_len         payload: the tensor [n_layers, block_tokens, row] in C
                        order, raw bytes of `dtype` in the host's byte order; a row is
                        one token's cache row: its MLA latent (kv_lora_rank +
                        qk_rope_head_dim), then for DeepSeek-V3.2 its indexer key
                        (the last index_dim values; 0 for V3)

The file size must be exactly 12 + meta_len + payload_bytes, so truncation or a
trailing append is caught before hashing.

Integrity vs identity: the key (sha256 of the token chain) says WHICH block a file
must be; the payload checksum only has to catch torn writes and bit rot, not an
adversary, so it is XXH3-128 (xxhash), ~27 GB/s on one core against sha256's
~1.9 GB/s: verifying no longer costs most of a load (a 4.5 MB block verifies in
~0.2 ms). Version 1 files (a "sha256" payload digest) are still read and verified
with sha256, so a store written by an older epserve keeps its hits. Version 3 adds
"index_dim" (V3.2's sparse attention keeps its indexer keys in the row): a version 1
or 2 block holds latents only, so it still serves a V3 store (index_dim 0) and is a
miss, `no_index_keys`, for a V3.2 one. New blocks are always version 3. The meta is JSON rather than packed
fields because it is tiny next to the payload (a DeepSeek-V3 bf16 block is
61 x 64 x 576 x 2 B = 4.5 MB) and `head -c 400 FILE` should tell a person what a
block is.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import xxhash

from epserve.errors import EpserveError

MAGIC = b"EPKV"
FORMAT_VERSION = 3
# version -> (meta field of the payload digest, digest of a payload buffer as lowercase hex)
CHECKSUMS = {1: ("sha256", lambda b: hashlib.sha256(b).hexdigest()), 2: ("xxh3_128", xxhash.xxh3_128_hexdigest),
             3: ("xxh3_128", xxhash.xxh3_128_hexdigest)}
PAYLOAD_ALIGN = 64
MAX_META_BYTES = 64 * 1024  # a bigger header is garbage, not a block
_PREFIX = struct.Struct("<4sHHI")  # magic, version, reserved, meta_len
SUFFIX = ".kvb"
KEY_RE = re.compile(r"[0-9a-f]{64}")
KEY_TAG = b"epserve.kv.v1"


class BlockFormatError(EpserveError, ValueError):
    """A block file that must not be used; `reason` is a short stable tag. The store turns it into a
    miss: it never leaves fleet/."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class BlockSpec:
    """What every block of one store holds: [n_layers, block_tokens, row] of `dtype`, the last
    index_dim values of each row being V3.2's indexer key (0: a V3 row, latent only)."""

    model_id: str
    dtype: torch.dtype
    shape: tuple[int, int, int]
    index_dim: int = 0

    @functools.cached_property        # read on every hit: computed once
    def numel(self) -> int:
        n_layers, block_tokens, kv_dim = self.shape
        return n_layers * block_tokens * kv_dim

    @functools.cached_property
    def payload_bytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def _header(spec: BlockSpec, key: str, payload_bytes: int, digest: str) -> bytes:
    meta = {
        "model_id": spec.model_id,
        "dtype": dtype_name(spec.dtype),
        "shape": list(spec.shape),
        "byteorder": sys.byteorder,
        "key": key,
        "payload_bytes": payload_bytes,
        CHECKSUMS[FORMAT_VERSION][0]: digest,
        "index_dim": spec.index_dim,
    }
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    meta_bytes += b" " * (-(_PREFIX.size + len(meta_bytes)) % PAYLOAD_ALIGN)
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(meta_bytes)) + meta_bytes


def encode_block(spec: BlockSpec, key: str, kv: torch.Tensor) -> list[bytes | memoryview]:
    """Header bytes and payload view for `kv` ([*spec.shape], spec.dtype), to write in order."""
    payload = memoryview(kv.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return [_header(spec, key, payload.nbytes, CHECKSUMS[FORMAT_VERSION][1](payload)), payload]


def file_bytes(spec: BlockSpec) -> int:
    """Size of every valid block file of `spec` (keys and digests are fixed-length hex)."""
    return len(_header(spec, "0" * 64, spec.payload_bytes, "0" * 32)) + spec.payload_bytes


@functools.lru_cache(maxsize=64)
def _template(spec: BlockSpec) -> tuple[bytes, bytes, bytes]:
    """A current-version header of spec cut around its key and digest: (before the key, between the
    key and the digest, after the digest)."""
    head = _header(spec, "0" * 64, spec.payload_bytes, "0" * 32)
    k = head.index(b'"key":"') + 7
    d = head.index(b'"%s":"' % CHECKSUMS[FORMAT_VERSION][0].encode()) + 12
    return head[:k], head[k + 64:d], head[d + 32:]


def header_bytes(spec: BlockSpec) -> int:
    """Length of a current-version header of spec (the payload starts there)."""
    pre, mid, post = _template(spec)
    return len(pre) + 64 + len(mid) + 32 + len(post)


def header_digest(head: bytes | bytearray, spec: BlockSpec, key: str) -> bytes | None:
    """The payload digest (hex, ascii) if `head` is byte for byte the header this version writes for
    (spec, key); None otherwise (decode_block's full parse then names the reason). Saves the JSON
    parse on every hit, which costs more than hashing a small block."""
    pre, mid, post = _template(spec)
    d = len(pre) + 64 + len(mid)
    if len(head) != d + 32 + len(post) or head[:d] != pre + key.encode() + mid or head[d + 32:] != post:
        return None
    return bytes(head[d:d + 32])


def payload_digest(payload) -> bytes:
    """Current-version checksum of a payload buffer, as header_digest returns it."""
    return CHECKSUMS[FORMAT_VERSION][1](payload).encode()


def decode_block(buf: bytearray, spec: BlockSpec, key: str) -> torch.Tensor:
    """The tensor [*spec.shape] in `buf` (a whole file), sharing its memory.

    Raises BlockFormatError with reason: truncated, bad_magic, bad_version,
    bad_meta, foreign_model, foreign_dtype, foreign_shape, foreign_byteorder,
    wrong_key, bad_size, checksum, no_index_keys (a version 1-2 block for a V3.2
    store), foreign_index_dim.
    """
    start = len(buf) - spec.payload_bytes
    digest = header_digest(bytes(buf[:start]), spec, key) if start > 0 else None
    if digest is not None:
        if payload_digest(memoryview(buf)[start:]) != digest:
            raise BlockFormatError("checksum", f"payload {CHECKSUMS[FORMAT_VERSION][0]} mismatch")
        return torch.frombuffer(buf, dtype=spec.dtype, count=spec.numel, offset=start).view(spec.shape)
    if len(buf) < _PREFIX.size:
        raise BlockFormatError("truncated", f"{len(buf)} bytes")
    magic, version, _, meta_len = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise BlockFormatError("bad_magic", repr(bytes(magic)))
    if version not in CHECKSUMS:
        raise BlockFormatError("bad_version", f"{version} is not one of {sorted(CHECKSUMS)}")
    digest_field, checksum = CHECKSUMS[version]
    start = _PREFIX.size + meta_len
    if meta_len > MAX_META_BYTES or start > len(buf):
        raise BlockFormatError("truncated", f"meta_len {meta_len}, file {len(buf)} bytes")
    try:
        meta = json.loads(bytes(buf[_PREFIX.size:start]))
        got = (meta["model_id"], meta["dtype"], tuple(meta["shape"]), meta["byteorder"],
               meta["key"], int(meta["payload_bytes"]), str(meta[digest_field]),
               int(meta["index_dim"]) if version >= 3 else None)
    except (ValueError, KeyError, TypeError) as e:  # incl. JSONDecodeError, UnicodeDecodeError
        raise BlockFormatError("bad_meta", str(e)) from None
    model_id, dtype, shape, byteorder, file_key, payload_bytes, digest, index_dim = got
    if index_dim is None and spec.index_dim:
        raise BlockFormatError("no_index_keys", f"a version {version} block holds latents only; this store's rows "
                                                f"end in {spec.index_dim} indexer-key values")
    checks = (("foreign_model", model_id, spec.model_id),
              ("foreign_dtype", dtype, dtype_name(spec.dtype)),
              ("foreign_shape", shape, spec.shape),
              ("foreign_byteorder", byteorder, sys.byteorder),
              ("wrong_key", file_key, key),
              ("bad_size", payload_bytes, spec.payload_bytes),
              ("foreign_index_dim", spec.index_dim if index_dim is None else index_dim, spec.index_dim))
    for reason, have, want in checks:
        if have != want:
            raise BlockFormatError(reason, f"{have!r} != {want!r}")
    if len(buf) != start + payload_bytes:
        raise BlockFormatError("truncated", f"{len(buf)} bytes, want {start + payload_bytes}")
    payload = memoryview(buf)[start:]
    if checksum(payload) != digest:
        raise BlockFormatError("checksum", f"payload {digest_field} mismatch")
    return torch.frombuffer(buf, dtype=spec.dtype, count=spec.numel, offset=start).view(spec.shape)


def block_keys(token_ids: Sequence[int], namespace: str, *, model_id: str,
               block_tokens: int = 64) -> list[str]:
    """Hex sha256 key per FULL block of `token_ids`, chained (see module docstring)."""
    tokens = np.asarray(token_ids, dtype="<i8").reshape(-1)
    keys, prev = [], b""
    for i in range(len(tokens) // block_tokens):
        h = hashlib.sha256()
        for field in (KEY_TAG, model_id.encode(), namespace.encode(), prev,
                      tokens[i * block_tokens:(i + 1) * block_tokens].tobytes()):
            h.update(len(field).to_bytes(8, "little"))
            h.update(field)
        prev = h.hexdigest().encode()
        keys.append(prev.decode())
    return keys


def write_atomic(path: Path, parts: list, fsync: bool) -> int:
    """Write `parts` to `path` via a unique temp file + os.replace; returns bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "wb") as f:
            n = sum(f.write(p) for p in parts)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return n
