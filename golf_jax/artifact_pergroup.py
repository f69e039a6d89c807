"""The 1.0611 record's per-group artifact: quantised matrices grouped by
role, rows reordered so that similar rows sit together, each group
compressed on its own; everything else in one brotli stream.

It takes a generic mapping name -> numpy array (the quantiser's output: int8 codes, fp16
scales, passthrough tensors, LQER factors, ...) and a spec of which names form the matrix
groups (`MatrixGroup`); it returns the same mapping on reading. No pickle: the manifest is JSON.

Format, version 1. All integers are little-endian uint32; nothing is padded.

    offset     size        field
    0          4           magic          b"PGRP" (the reference's)
    4          4           version        FORMAT_VERSION
    8          4           count          number of streams, len(groups) + 2
    12         4*count     lengths        of each stream
    12+4*count 4           crc32          zlib.crc32 of all the streams, back to back
    16+4*count ...         the streams, back to back; nothing may follow

Streams, in order (the reference's):
  - one per matrix group, in the spec's order: the group's int8 matrices in
    layer order, each row-reordered (if the group says so) and transposed,
    their bytes concatenated and compressed with the group compressor
    (`golf_jax.compressors`); empty when no tensor belongs to the group;
  - the remainder: brotli (quality 11, window 2**24) of
        uint64 json_length, JSON header (UTF-8, sorted keys), payload
    where the JSON is {"format_version", "meta", "compressor", "groups",
    "tensors"}: "groups" gives, per group stream, {"key", "reorder_rows",
    "members": the [name, shape] of each member in stream order} (so the
    reader needs no spec); "tensors" lists every other array as {"name", "dtype",
    "shape", "offset", "nbytes"} into the payload (C order, little-endian);
  - the row permutations: brotli (quality 11, default window) of every
    reordered matrix's uint16 permutation, in stream order; empty if none.

The reference's container has no version, no checksum and pickles the
remainder with torch.save; this one differs only in those: the group and
permutation streams are the reference's bytes, and the JSON remainder is a
few kilobytes smaller than torch.save's zip of pickles (4,261 bytes, 0.04%,
on the record-size tensors of tests/frontier_reference/pergroup_sizes.py).

The groups are coded side by side, one thread each (`workers`): the
reference codes them one after another, and lrzip's ZPAQ at level 9 codes
about 0.2 MB/s per group, so the record's seven groups took 168 s in a row on
the H200 host (docs/performance.md). The bytes do not depend on it.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from golf_jax import atomic, compressors
from golf_jax.artifact import ArtifactError

MAGIC = b"PGRP"
FORMAT_VERSION = 1
HEAD = struct.Struct("<4sII")  # magic, version, stream count
U32 = struct.Struct("<I")
JSON_LENGTH = struct.Struct("<Q")
MAX_PERMUTED_ROWS = 1 << 16  # permutations are stored as uint16
REMAINDER_DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
                    "float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class MatrixGroup:
    """int8 tensors named `key` or `blocks.<layer>.<key>` form one stream."""
    key: str
    reorder_rows: bool = False


# The reference's groups, in its order (_GROUP_ORDER, _SIMSORT_KEYS).
REFERENCE_GROUPS = (
    MatrixGroup("tok_emb.weight.q", reorder_rows=True),
    MatrixGroup("attn.c_k.weight.q"),
    MatrixGroup("attn.c_q.weight.q", reorder_rows=True),
    MatrixGroup("attn.c_v.weight.q"),
    MatrixGroup("attn.proj.weight.q"),
    MatrixGroup("mlp.fc.weight.q", reorder_rows=True),
    MatrixGroup("mlp.proj.weight.q"),
)


# ----------------------------------------------------------------------------- row reordering

def similarity_order_l1(matrix: np.ndarray) -> np.ndarray:
    """The reference's greedy nearest-neighbour chain (_similarity_sort_l1):
    start at row 0, then repeatedly step to the unused row nearest to the
    current one in L1 distance (float32; ties to the lowest index). Returns
    the row order as uint16.

    Same result, cheaper: the unused rows live in a compacted array (a used
    row is swapped out with the last one), and int8 rows are compared in
    int16/int32, which is exact, as are the float32 sums of the reference
    (integers below 2**24)."""
    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] == 0:
        raise ValueError(f"row reordering needs a 2-D matrix with at least one row, got shape {m.shape}")
    n = m.shape[0]
    if n > MAX_PERMUTED_ROWS:
        raise ValueError(f"row reordering stores uint16 permutations: {n} rows is more than {MAX_PERMUTED_ROWS}")
    exact_int = m.dtype == np.int8
    rows = m.astype(np.int16 if exact_int else np.float32)
    index = np.arange(n)
    scratch = np.empty_like(rows)
    order = np.empty(n, np.uint16)
    current, left = 0, n  # rows[:left] are the unused ones, index[:left] their row numbers
    for step in range(n):
        order[step] = index[current]
        cur = rows[current].copy()
        left -= 1  # swap the chosen row out of the unused ones
        rows[current], index[current] = rows[left], index[left]
        if left == 0:
            break
        diff = np.subtract(rows[:left], cur, out=scratch[:left])
        dists = np.abs(diff, out=diff).sum(axis=1, dtype=np.int32 if exact_int else np.float32)
        ties = np.flatnonzero(dists == dists.min())
        current = ties[np.argmin(index[ties])]
    return order


# ----------------------------------------------------------------------------- writing

def route(arrays: Mapping[str, np.ndarray], groups=REFERENCE_GROUPS) -> tuple[list[list[str]], list[str]]:
    """(members of each group in stream order, every other name sorted). Only
    int8 arrays are grouped, as in the reference; a group's members are in
    layer order (a name equal to the key counts as layer 0)."""
    patterns = [re.compile(r"(?:blocks\.(\d+)\.)?" + re.escape(g.key)) for g in groups]
    members: list[list[tuple[int, str]]] = [[] for _ in groups]
    rest = []
    for name in sorted(arrays):
        arr = arrays[name]
        hit = None
        if np.asarray(arr).dtype == np.int8:
            hit = next(((i, m) for i, p in enumerate(patterns) if (m := p.fullmatch(name))), None)
        if hit is None:
            rest.append(name)
        else:
            i, match = hit
            members[i].append((int(match.group(1) or 0), name))
    return [[name for _, name in sorted(m)] for m in members], rest


def _group_stream(arrays, names, group: MatrixGroup, compress) -> tuple[bytes, bytes]:
    """(compressed group bytes, its permutations' bytes)."""
    parts, perms = [], []
    for name in names:
        arr = np.asarray(arrays[name])
        if arr.ndim == 2:
            if group.reorder_rows and arr.shape[0]:
                try:
                    order = similarity_order_l1(arr)
                except ValueError as e:
                    raise ArtifactError(f"cannot serialise tensor {name!r}: {e}") from e
                perms.append(order.astype("<u2").tobytes())
                arr = arr[order]
            arr = arr.T
        parts.append(np.ascontiguousarray(arr).tobytes())
    raw = b"".join(parts)
    return (compress(raw) if raw else b""), b"".join(perms)


def _remainder_body(arrays, rest: list[str], manifest, meta, compressor: str) -> bytes:
    entries, regions, offset = [], [], 0
    for name in rest:
        arr = np.asarray(arrays[name])
        if arr.dtype.name not in REMAINDER_DTYPES:
            raise ArtifactError(f"cannot serialise tensor {name!r}: dtype {arr.dtype.name} is not one of "
                                f"{', '.join(REMAINDER_DTYPES)}")
        data = np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")
        entries.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape),
                        "offset": offset, "nbytes": data.nbytes})
        regions.append(data.tobytes())
        offset += data.nbytes
    try:
        header = json.dumps({"format_version": FORMAT_VERSION, "meta": meta, "compressor": compressor,
                             "groups": manifest, "tensors": entries},
                            sort_keys=True, separators=(",", ":"), default=_json_default).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"meta is not JSON-serialisable: {e}") from e
    return b"".join([JSON_LENGTH.pack(len(header)), header, *regions])


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def map_in_threads(fn: Callable, items: Sequence, workers: int | None = None) -> list:
    """[fn(item) for item in items] on up to `workers` threads (None: one per
    CPU), in order; the first exception is raised. For work that releases the
    GIL: an lrzip process, a C coder, numpy."""
    workers = min(workers or os.cpu_count() or 1, len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(workers, thread_name_prefix="golf_jax_group") as pool:
        return list(pool.map(fn, items))


def serialize(arrays: Mapping[str, np.ndarray], meta=None, groups=REFERENCE_GROUPS,
              compressor: str = "lrzip", workers: int | None = None) -> bytes:
    """The complete artifact bytes; deterministic for the zpaq, brotli and
    lzma group compressors (lrzip's may depend on the machine's threads).
    The groups are reordered and coded on up to `workers` threads."""
    for name in arrays:
        if not isinstance(name, str):
            raise ArtifactError(f"cannot serialise tensor {name!r}: tensor names must be strings")
    compress, _ = compressors.get(compressor)
    members, rest = route(arrays, groups)
    coded = map_in_threads(lambda job: _group_stream(arrays, job[1], job[0], compress),
                           list(zip(groups, members)), workers)
    streams, perms = [stream for stream, _ in coded], [perm for _, perm in coded]
    manifest = [{"key": group.key, "reorder_rows": group.reorder_rows,
                 "members": [[name, list(np.shape(arrays[name]))] for name in names]}
                for group, names in zip(groups, members)]
    brotli = compressors.brotli_module()
    body = _remainder_body(arrays, rest, manifest, meta, compressor)
    streams.append(brotli.compress(body, quality=11, lgwin=24))
    all_perms = b"".join(perms)
    # reference quirk: the permutations get brotli's default window, the remainder 2**24.
    streams.append(brotli.compress(all_perms, quality=11) if all_perms else b"")
    lengths = b"".join(U32.pack(len(s)) for s in streams)
    crc = zlib.crc32(b"".join(streams))
    return b"".join([HEAD.pack(MAGIC, FORMAT_VERSION, len(streams)), lengths, U32.pack(crc), *streams])


def write_artifact(path: str | Path, arrays: Mapping[str, np.ndarray], meta=None, groups=REFERENCE_GROUPS,
                   compressor: str = "lrzip", workers: int | None = None) -> int:
    """Write the artifact atomically (golf_jax.atomic); returns its size in bytes."""
    return atomic.write_bytes(path, serialize(arrays, meta, groups, compressor, workers))


def stream_sizes(buf: bytes, groups=REFERENCE_GROUPS) -> dict[str, int]:
    """Compressed bytes of each stream, by group key, then "remainder" and
    "permutations", and "container" (header and table)."""
    lengths = _split(memoryview(buf).cast("B"), lambda why: ArtifactError(f"<bytes>: {why}"))[0]
    names = [g.key for g in groups] + ["remainder", "permutations"]
    if len(names) != len(lengths):
        raise ArtifactError(f"<bytes>: {len(lengths)} streams, the groups give {len(names)}")
    sizes = dict(zip(names, lengths))
    sizes["container"] = len(buf) - sum(lengths)
    return sizes


# ----------------------------------------------------------------------------- reading

def is_pergroup(path: str | Path) -> bool:
    """Whether the file starts as this format does (else: the 1.1147 record's artifact)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False  # the reader that follows names the problem


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise ArtifactError(f"{path}: artifact not found" if not path.exists() else f"{path}: not a file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read artifact ({e})") from e


def read_artifact(path: str | Path, workers: int | None = None) -> tuple[dict[str, np.ndarray], object]:
    """(arrays, meta) from an artifact file; arrays sorted by name; groups decoded on `workers` threads."""
    return deserialize(_read_bytes(Path(path)), source=str(path), workers=workers)


def read_meta(path: str | Path) -> object:
    """An artifact's meta (its config among it) without decoding its groups: the evaluation
    compiles its programs from it while the groups decompress (lrzip: ~30 s at record size)."""
    fail = lambda why: ArtifactError(f"{path}: {why}")  # noqa: E731
    _, streams = _split(memoryview(_read_bytes(Path(path))).cast("B"), fail)
    return _parse_remainder(streams[-2], len(streams) - 2, fail)[0]["meta"]


def deserialize(buf: bytes, source: str = "<bytes>",
                workers: int | None = None) -> tuple[dict[str, np.ndarray], object]:
    """(arrays, meta) from artifact bytes; every problem is an ArtifactError
    whose message starts with `source`. The groups are decoded on up to
    `workers` threads."""
    def fail(why: str) -> ArtifactError:
        return ArtifactError(f"{source}: {why}")

    lengths, streams = _split(memoryview(buf).cast("B"), fail)
    header, payload = _parse_remainder(streams[-2], len(streams) - 2, fail)
    perms = _unbrotli(streams[-1], "the permutations", fail) if lengths[-1] else b""
    _, decompress = compressors.get(header["compressor"])
    arrays = _remainder_arrays(header["tensors"], payload, fail)
    groups = header["groups"]
    raws = map_in_threads(lambda job: _decompress_group(*job, decompress, fail), list(zip(streams, groups)), workers)
    perm_offset = 0
    for raw, group in zip(raws, groups):
        perm_offset = _unpack_group(raw, group, perms, perm_offset, arrays, fail)
    if perm_offset != len(perms):
        raise fail(f"{len(perms) - perm_offset} permutation bytes are left over: the artifact is corrupted")
    return dict(sorted(arrays.items())), header["meta"]


def _split(buf: memoryview, fail) -> tuple[list[int], list[memoryview]]:
    size = len(buf)
    if size == 0:
        raise fail("empty file, not an artifact")
    if bytes(buf[:len(MAGIC)]) != MAGIC[:min(size, len(MAGIC))]:
        raise fail(f"not a per-group artifact (magic {bytes(buf[:len(MAGIC)])!r}, expected {MAGIC!r})")
    if size < HEAD.size:
        raise fail(f"truncated artifact: {size} bytes, shorter than the {HEAD.size}-byte header")
    _, version, count = HEAD.unpack_from(buf)
    if version != FORMAT_VERSION:
        raise fail(f"per-group artifact format version {version}, this golf_jax reads version {FORMAT_VERSION}")
    table_end = HEAD.size + U32.size * (count + 1)
    if count < 2:
        raise fail(f"malformed header: {count} streams, at least 2 (remainder, permutations) are needed")
    if size < table_end:
        raise fail(f"truncated artifact: {size} bytes, shorter than the {table_end}-byte header and length table")
    lengths = [U32.unpack_from(buf, HEAD.size + U32.size * i)[0] for i in range(count)]
    (crc,) = U32.unpack_from(buf, table_end - U32.size)
    have, want = size - table_end, sum(lengths)
    if have < want:
        raise fail(f"truncated artifact: the length table says the streams are {want} bytes, only {have} are present")
    if have > want:
        raise fail(f"{have - want} unexpected bytes after the {want} bytes of streams")
    body = buf[table_end:]
    if zlib.crc32(body) != crc:
        raise fail(f"checksum mismatch (CRC32 of the streams is {zlib.crc32(body):#010x}, "
                   f"the header says {crc:#010x}): the artifact is corrupted")
    offsets = np.cumsum([0] + lengths)
    return lengths, [body[offsets[i]:offsets[i + 1]] for i in range(count)]


def _unbrotli(stream: memoryview, what: str, fail) -> bytes:
    try:
        return compressors.brotli_module().decompress(bytes(stream))
    except compressors.brotli_module().error as e:
        raise fail(f"brotli decode error in {what} ({e}): the artifact is corrupted") from e


def _parse_remainder(stream: memoryview, n_groups: int, fail) -> tuple[dict, memoryview]:
    raw = _unbrotli(stream, "the remainder", fail)
    if len(raw) < JSON_LENGTH.size:
        raise fail(f"malformed remainder: {len(raw)} bytes, too short for the JSON header length")
    (json_length,) = JSON_LENGTH.unpack_from(raw)
    if json_length > len(raw) - JSON_LENGTH.size:
        raise fail(f"malformed remainder: JSON header length {json_length} runs past its {len(raw)} bytes")
    try:
        header = json.loads(raw[JSON_LENGTH.size:JSON_LENGTH.size + json_length].decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise fail(f"malformed JSON header ({e})") from e
    keys = {"format_version", "meta", "compressor", "groups", "tensors"}
    if not isinstance(header, dict) or not keys <= header.keys():
        raise fail(f"malformed JSON header: expected an object with {', '.join(sorted(keys))}")
    if header["format_version"] != FORMAT_VERSION:
        raise fail(f"malformed JSON header: format_version {header['format_version']!r} "
                   f"does not match the outer header's {FORMAT_VERSION}")
    if header["compressor"] not in compressors.COMPRESSORS:
        raise fail(f"unknown group compressor {header['compressor']!r}: "
                   f"one of {', '.join(compressors.COMPRESSORS)}")
    groups, tensors = header["groups"], header["tensors"]
    if not isinstance(groups, list) or len(groups) != n_groups or not isinstance(tensors, list):
        raise fail(f"malformed JSON header: groups must list the {n_groups} group streams and tensors must be a list")
    return header, memoryview(raw)[JSON_LENGTH.size + json_length:]


def _shape(value, what: str, fail) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(d) is int and d >= 0 for d in value) or len(value) > 32:
        raise fail(f"{what}: shape {value!r} is not a list of at most 32 non-negative integers")
    return tuple(value)


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # jax's own dependency; numpy has no bfloat16
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _remainder_arrays(entries: list, payload: memoryview, fail) -> dict[str, np.ndarray]:
    arrays, claimed = {}, 0
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not {"name", "dtype", "shape", "offset", "nbytes"} <= e.keys():
            raise fail(f"tensor table entry {i}: expected an object with name, dtype, shape, offset and nbytes")
        name, where = e["name"], f"tensor {e['name']!r}"
        if not isinstance(name, str) or name in arrays:
            raise fail(f"tensor table entry {i}: name {name!r} is not a string or is a duplicate")
        if e["dtype"] not in REMAINDER_DTYPES:
            raise fail(f"{where}: dtype {e['dtype']!r} is not one of {', '.join(REMAINDER_DTYPES)}")
        shape, dtype = _shape(e["shape"], where, fail), _numpy_dtype(e["dtype"])
        offset, nbytes = e["offset"], e["nbytes"]
        if type(offset) is not int or type(nbytes) is not int or offset != claimed:
            raise fail(f"{where}: offset {offset!r} is not the next payload byte {claimed}")
        if nbytes != math.prod(shape) * dtype.itemsize or offset + nbytes > len(payload):
            raise fail(f"{where}: {nbytes} bytes at {offset} do not hold shape {list(shape)} of {e['dtype']} "
                       f"inside the {len(payload)}-byte payload")
        flat = np.frombuffer(payload, dtype=dtype.newbyteorder("<"), count=nbytes // dtype.itemsize, offset=offset)
        arrays[name] = flat.astype(dtype, copy=True).reshape(shape)
        claimed += nbytes
    if claimed != len(payload):
        raise fail(f"the tensor table claims {claimed} payload bytes, the payload has {len(payload)}")
    return arrays


def _group_shapes(group, fail) -> list[tuple[int, ...]]:
    if not isinstance(group, dict) or not {"key", "reorder_rows", "members"} <= group.keys():
        raise fail("malformed JSON header: a group is not an object with key, reorder_rows and members")
    return [_shape(m[1] if isinstance(m, list) and len(m) == 2 else None, f"group {group['key']!r}", fail)
            for m in group["members"]]


def _decompress_group(stream, group, decompress, fail) -> bytes:
    """One group's raw int8 bytes, checked against its members' shapes."""
    want = sum(math.prod(s) for s in _group_shapes(group, fail))
    key = group["key"]
    if not group["members"]:
        if len(stream):
            raise fail(f"group {key!r}: a stream of {len(stream)} bytes for no tensors")
        return b""
    try:
        raw = decompress(bytes(stream))
    except Exception as e:  # each compressor has its own error types; all mean a bad stream here
        raise fail(f"group {key!r}: cannot decompress its stream ({e}): the artifact is corrupted") from e
    if len(raw) != want:
        raise fail(f"group {key!r}: {len(raw)} bytes decompressed, its tensors need {want}")
    return raw


def _unpack_group(raw: bytes, group, perms: bytes, perm_offset: int, arrays: dict, fail) -> int:
    """Put one group's matrices (its decompressed bytes) into `arrays`;
    returns the next permutation offset."""
    key, members, shapes = group["key"], group["members"], _group_shapes(group, fail)
    flat, offset = np.frombuffer(raw, dtype=np.int8), 0
    for (name, _), shape in zip(members, shapes):
        if not isinstance(name, str) or name in arrays:
            raise fail(f"group {key!r}: tensor name {name!r} is not a string or is a duplicate")
        chunk = flat[offset:offset + math.prod(shape)]
        offset += chunk.size
        if len(shape) == 2:
            chunk = chunk.reshape(shape[1], shape[0]).T
            if group["reorder_rows"]:
                end = perm_offset + 2 * shape[0]
                order = np.frombuffer(perms[perm_offset:end], dtype="<u2").astype(np.int64)
                if order.size != shape[0] or not np.array_equal(np.sort(order), np.arange(shape[0])):
                    raise fail(f"tensor {name!r}: its row permutation is missing or invalid")
                unordered = np.empty_like(chunk)
                unordered[order] = chunk
                chunk, perm_offset = unordered, end
        arrays[name] = np.array(chunk.reshape(shape), dtype=np.int8, order="C")
    return perm_offset
