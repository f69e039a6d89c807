"""The submission artifact: a quantised model and its metadata in one
LZMA-compressed file, and the byte budget it is scored against.

Format, version 1. All integers are little-endian; nothing is padded.

Outer header (24 bytes, struct "<8sIQI"), uncompressed:

    offset  size  field
    0       8     magic          b"GOLFJAX\\0"
    8       4     version        uint32, FORMAT_VERSION
    12      8     body_length    uint64, bytes of the compressed body
    20      4     body_crc32     uint32, zlib.crc32 of the compressed body
    24      body_length          the compressed body: one .xz stream

Nothing may follow the body. The checksum is CRC32 because its job is to
catch accidental damage (a truncated copy, a flipped bit) before the bytes
reach the LZMA decoder, which it does in 4 bytes with the stdlib's zlib;
nobody forges artifacts, so a cryptographic hash would buy nothing. The
.xz stream carries its own CRC64 of the decompressed bytes as well.

The body is `lzma.compress(raw, format=FORMAT_XZ, preset=preset)`: the
reference compresses with lzma preset 9 in lzma's default format, which is
FORMAT_XZ, so the compressed size behaves as the reference's does. The price against FORMAT_ALONE
(LZMA1, 13-byte header): about 50 bytes of .xz framing (stream header and
footer, block header, index, CRC64) plus LZMA2's chunk headers, measured at
0.017% of the output: about 2.7 KB of a 16 MB artifact.

Decompressed body (`raw`):

    offset      size         field
    0           8            json_length   uint64
    8           json_length  JSON header, UTF-8
    8+json_length ...        payload

The JSON header is written with sorted keys and compact separators:

    {"format_version": 1,            the version again, checked against the outer one
     "meta": ...,                    free-form: the run's config dict, the quantisation report, ...
     "tensors": [entry, ...]}        in the QuantizedModel's insertion order

    entry = {"name": "qo_bank",
             "kind": "int6" | "int8" | "fp16" | "fp32",
             "dtype": "float32" | "bfloat16" | "float16",    what to dequantise to
             "shape": [int, ...],                            of the data
             "data": region,
             "scale": region | null}                         a region for int6/int8 only
    region = {"dtype": "int8" | "float16" | "float32",       numpy storage dtype, little-endian
              "shape": [int, ...],
              "offset": int, "nbytes": int}                  into the payload

The payload is every region's bytes in C order, in table order (each
tensor's data, then its scale), back to back. Data storage is int8 for
int6/int8, float16 for fp16, float32 for fp32; scales are float16 or
float32 with shape = data shape minus its last axis.

reference quirk: int6 values are stored one per int8 byte, as the reference
stores them; LZMA's entropy coder mostly stops paying for the two idle bits,
and the compressed size is the one that counts.

No pickle anywhere: the reader parses JSON and builds arrays from raw bytes.
"""

from __future__ import annotations

import json
import lzma
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from golf_jax import atomic
from golf_jax.quant import FP16, FP32, INT6, INT8, KINDS, QTensor, QuantizedModel

MAGIC = b"GOLFJAX\x00"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIQI")  # magic, version, body_length, body_crc32
JSON_LENGTH = struct.Struct("<Q")

STORAGE_DTYPE = {INT6: "int8", INT8: "int8", FP16: "float16", FP32: "float32"}
SCALE_DTYPES = ("float16", "float32")
PARAM_DTYPES = ("float32", "bfloat16", "float16")
INT6_RANGE = (-32, 31)  # what six bits hold; the quantiser's clip range lies inside


class ArtifactError(ValueError):
    """An artifact that cannot be written or read; the message names the file
    (or "<bytes>") and the problem."""


# ----------------------------------------------------------------------------- writing

def serialize(qmodel: QuantizedModel, meta, preset: int = 9) -> bytes:
    """The complete artifact bytes. Deterministic: the same model and meta
    give the same bytes. `meta` must be JSON-able (numpy scalars and arrays
    are converted); note JSON turns tuples into lists and keys into strings."""
    entries, regions, offset = [], [], 0
    for name, qt in qmodel.items():
        data, scale = _check_qtensor(name, qt)
        entry = {"name": name, "kind": qt.kind, "dtype": qt.dtype, "shape": list(data.shape)}
        for key, arr in (("data", data), ("scale", scale)):
            if arr is None:
                entry[key] = None
                continue
            entry[key] = {"dtype": arr.dtype.name, "shape": list(arr.shape), "offset": offset, "nbytes": arr.nbytes}
            regions.append(arr)
            offset += arr.nbytes
        entries.append(entry)
    try:
        header = json.dumps({"format_version": FORMAT_VERSION, "meta": meta, "tensors": entries},
                            sort_keys=True, separators=(",", ":"), default=_json_default).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"meta is not JSON-serialisable: {e}") from e
    # Arrays export their buffers, so join copies each tensor exactly once.
    raw = b"".join([JSON_LENGTH.pack(len(header)), header, *regions])
    try:
        body = lzma.compress(raw, format=lzma.FORMAT_XZ, preset=preset)
    except (lzma.LZMAError, TypeError, ValueError) as e:
        raise ArtifactError(f"cannot compress with LZMA preset {preset!r}: {e}") from e
    return HEADER.pack(MAGIC, FORMAT_VERSION, len(body), zlib.crc32(body)) + body


def _check_qtensor(name, qt) -> tuple[np.ndarray, np.ndarray | None]:
    """The QTensor's data and scale as C-order little-endian arrays, after
    checking it is something `deserialize` will accept back."""
    def bad(why: str) -> ArtifactError:
        return ArtifactError(f"cannot serialise tensor {name!r}: {why}")

    if not isinstance(name, str):
        raise bad("tensor names must be strings")
    if not isinstance(qt, QTensor):
        raise bad(f"expected a QTensor, got {type(qt).__name__}")
    if qt.kind not in KINDS:
        raise bad(f"kind {qt.kind!r} is not one of {', '.join(KINDS)}")
    if qt.dtype not in PARAM_DTYPES:
        raise bad(f"dtype {qt.dtype!r} is not one of {', '.join(PARAM_DTYPES)}")
    data = np.asarray(qt.data)
    if data.dtype.name != STORAGE_DTYPE[qt.kind]:
        raise bad(f"kind {qt.kind} stores {STORAGE_DTYPE[qt.kind]} data, got {data.dtype.name}")
    if qt.kind == INT6 and data.size and (data.min() < INT6_RANGE[0] or data.max() > INT6_RANGE[1]):
        raise bad(f"int6 values must lie in [{INT6_RANGE[0]}, {INT6_RANGE[1]}], "
                  f"got [{data.min()}, {data.max()}]")
    scale = None
    if qt.kind in (INT6, INT8):
        if qt.scale is None:
            raise bad(f"kind {qt.kind} needs a scale")
        scale = np.asarray(qt.scale)
        if scale.dtype.name not in SCALE_DTYPES:
            raise bad(f"scale dtype {scale.dtype.name} is not one of {', '.join(SCALE_DTYPES)}")
        if data.ndim == 0 or scale.shape != data.shape[:-1]:
            raise bad(f"scale shape {scale.shape} is not the data shape {data.shape} minus its last axis")
        scale = _little_endian(scale)
    elif qt.scale is not None:
        raise bad(f"kind {qt.kind} has no scale, got one")
    return _little_endian(data), scale


def _little_endian(arr: np.ndarray) -> np.ndarray:
    # Not np.ascontiguousarray: it turns a 0-d array into a 1-d one.
    return np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def write_artifact(path: str | Path, qmodel: QuantizedModel, meta, preset: int = 9) -> int:
    """Write the artifact atomically; returns its size in bytes.

    The bytes go to a temporary name in the same directory, are fsynced, and
    only then renamed over `path`, so a crash leaves either the old artifact
    or the new one under that name, never half of one."""
    return atomic.write_bytes(path, serialize(qmodel, meta, preset))


# ----------------------------------------------------------------------------- reading

def read_artifact(path: str | Path) -> tuple[QuantizedModel, object]:
    """(qmodel, meta) from an artifact file."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: artifact not found")
    if not path.is_file():
        raise ArtifactError(f"{path}: not a file")
    try:
        buf = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read artifact ({e})") from e
    return deserialize(buf, source=str(path))


def deserialize(buf: bytes, source: str = "<bytes>") -> tuple[QuantizedModel, object]:
    """(qmodel, meta) from artifact bytes; every problem is an ArtifactError
    whose message starts with `source`."""
    def fail(why: str) -> ArtifactError:
        return ArtifactError(f"{source}: {why}")

    buf = memoryview(buf).cast("B")
    size = len(buf)
    if size == 0:
        raise fail("empty file, not an artifact")
    if bytes(buf[:len(MAGIC)]) != MAGIC[:min(size, len(MAGIC))]:
        raise fail(f"not a golf_jax artifact (magic {bytes(buf[:len(MAGIC)])!r}, expected {MAGIC!r})")
    if size < HEADER.size:
        raise fail(f"truncated artifact: {size} bytes, shorter than the {HEADER.size}-byte header")
    _, version, body_length, crc = HEADER.unpack_from(buf)
    if version != FORMAT_VERSION:
        raise fail(f"artifact format version {version}, this golf_jax reads version {FORMAT_VERSION}")
    have = size - HEADER.size
    if have < body_length:
        raise fail(f"truncated artifact: the header says the body is {body_length} bytes, only {have} are present")
    if have > body_length:
        raise fail(f"{have - body_length} unexpected bytes after the {body_length}-byte body")
    body = buf[HEADER.size:]
    if zlib.crc32(body) != crc:
        raise fail(f"checksum mismatch (CRC32 of the body is {zlib.crc32(body):#010x}, "
                   f"the header says {crc:#010x}): the artifact is corrupted")
    try:
        raw = lzma.decompress(body, format=lzma.FORMAT_XZ)
    except lzma.LZMAError as e:
        raise fail(f"LZMA decode error in the body ({e}): the artifact is corrupted") from e
    return _parse_body(raw, fail)


def _parse_body(raw: bytes, fail) -> tuple[QuantizedModel, object]:
    if len(raw) < JSON_LENGTH.size:
        raise fail(f"malformed body: {len(raw)} bytes, too short for the JSON header length")
    (json_length,) = JSON_LENGTH.unpack_from(raw)
    if json_length > len(raw) - JSON_LENGTH.size:
        raise fail(f"malformed body: JSON header length {json_length} runs past the "
                   f"{len(raw)}-byte body")
    try:
        header = json.loads(raw[JSON_LENGTH.size:JSON_LENGTH.size + json_length].decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise fail(f"malformed JSON header ({e})") from e
    if not isinstance(header, dict) or not {"format_version", "meta", "tensors"} <= header.keys():
        raise fail("malformed JSON header: expected an object with format_version, meta and tensors")
    if type(header["format_version"]) is not int or header["format_version"] != FORMAT_VERSION:
        raise fail(f"malformed JSON header: format_version {header['format_version']!r} "
                   f"does not match the outer header's {FORMAT_VERSION}")
    table = header["tensors"]
    if not isinstance(table, list):
        raise fail("malformed JSON header: tensors is not a list")
    payload = memoryview(raw)[JSON_LENGTH.size + json_length:]
    qmodel, claimed = {}, 0
    for i, entry in enumerate(table):
        name, qt, nbytes = _parse_entry(i, entry, payload, fail)
        if name in qmodel:
            raise fail(f"tensor table entry {i}: duplicate name {name!r}")
        qmodel[name] = qt
        claimed += nbytes
    if claimed != len(payload):
        raise fail(f"the tensor table claims {claimed} payload bytes, the payload has {len(payload)}")
    return qmodel, header["meta"]


def _parse_entry(i: int, entry, payload: memoryview, fail) -> tuple[str, QTensor, int]:
    """One table entry's (name, QTensor, payload bytes it claims)."""
    if not isinstance(entry, dict) or not {"name", "kind", "dtype", "shape", "data", "scale"} <= entry.keys():
        raise fail(f"tensor table entry {i}: expected an object with name, kind, dtype, shape, data and scale")
    name = entry["name"]
    if not isinstance(name, str):
        raise fail(f"tensor table entry {i}: name {name!r} is not a string")
    where = f"tensor {name!r}"
    kind, dtype = entry["kind"], entry["dtype"]
    if kind not in KINDS:
        raise fail(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    if dtype not in PARAM_DTYPES:
        raise fail(f"{where}: dtype {dtype!r} is not one of {', '.join(PARAM_DTYPES)}")
    shape = _shape(entry["shape"], f"{where}: shape", fail)
    data = _region(entry["data"], (STORAGE_DTYPE[kind],), payload, f"{where}: data", fail)
    if data.shape != shape:
        raise fail(f"{where}: data shape {list(data.shape)} does not match the tensor shape {list(shape)}")
    if kind == INT6 and data.size and (data.min() < INT6_RANGE[0] or data.max() > INT6_RANGE[1]):
        raise fail(f"{where}: int6 values outside [{INT6_RANGE[0]}, {INT6_RANGE[1]}]")
    scale = None
    if kind in (INT6, INT8):
        if entry["scale"] is None:
            raise fail(f"{where}: kind {kind} needs a scale")
        scale = _region(entry["scale"], SCALE_DTYPES, payload, f"{where}: scale", fail)
        if not shape or scale.shape != shape[:-1]:
            raise fail(f"{where}: scale shape {list(scale.shape)} is not the data shape {list(shape)} "
                       "minus its last axis")
    elif entry["scale"] is not None:
        raise fail(f"{where}: kind {kind} has no scale, the table gives one")
    nbytes = data.nbytes + (scale.nbytes if scale is not None else 0)
    return name, QTensor(kind, data, scale, dtype), nbytes


def _shape(value, what: str, fail) -> tuple[int, ...]:
    # bool is an int to Python, not to a shape.
    if not isinstance(value, list) or not all(type(d) is int and d >= 0 for d in value) or len(value) > 32:
        raise fail(f"{what} {value!r} is not a list of at most 32 non-negative integers")
    return tuple(value)


def _region(region, dtypes: tuple[str, ...], payload: memoryview, what: str, fail) -> np.ndarray:
    """A writable native-order copy of one region of the payload."""
    if not isinstance(region, dict) or not {"dtype", "shape", "offset", "nbytes"} <= region.keys():
        raise fail(f"{what}: expected an object with dtype, shape, offset and nbytes")
    if region["dtype"] not in dtypes:
        raise fail(f"{what}: storage dtype {region['dtype']!r} is not allowed here "
                   f"(expected {' or '.join(dtypes)})")
    shape = _shape(region["shape"], f"{what}: shape", fail)
    offset, nbytes = region["offset"], region["nbytes"]
    if type(offset) is not int or type(nbytes) is not int or offset < 0 or nbytes < 0:
        raise fail(f"{what}: offset {offset!r} and nbytes {nbytes!r} must be non-negative integers")
    if offset + nbytes > len(payload):
        raise fail(f"{what}: bytes [{offset}, {offset + nbytes}) are out of bounds of the "
                   f"{len(payload)}-byte payload")
    stored = np.dtype(region["dtype"]).newbyteorder("<")
    expected = math.prod(shape) * stored.itemsize
    if nbytes != expected:
        raise fail(f"{what}: {nbytes} bytes do not hold shape {list(shape)} of {region['dtype']} "
                   f"({expected} bytes)")
    try:
        flat = np.frombuffer(payload, dtype=stored, count=nbytes // stored.itemsize, offset=offset)
        return flat.astype(stored.newbyteorder("="), copy=True).reshape(shape)
    except (ValueError, OverflowError, MemoryError) as e:  # e.g. a zero-size shape with an absurd dimension
        raise fail(f"{what}: cannot build an array of shape {list(shape)} ({e})") from e


# ----------------------------------------------------------------------------- the budget

# The packages that train, quantise, load and evaluate a model: golf_jax and
# the kernels its model runs on GPUs, without golf_jax/tools (bench,
# profiling: see its docstring).
CODE_PACKAGES = ("golf_jax", "kernels")
NOT_COUNTED = ("golf_jax/tools",)


def code_bytes(root: str | Path | None = None) -> int:
    """Bytes of the code that loads and evaluates the artifact.

    The reference counts the UTF-8 bytes of its one training script, which
    both trains and evaluates. Our equivalent is the packages: every `*.py`
    under `golf_jax/` and `kernels/` (subpackages included, `golf_jax/tools` excepted), counted as file
    sizes on disk; `root` counts one directory tree instead. Entry points
    outside them (`train.py`, configs, tests) are not needed to load and
    evaluate, and third-party libraries (jax here, torch there) are not
    counted by either."""
    return sum(p.stat().st_size for p in code_files(root))


def code_files(root: str | Path | None = None) -> list[Path]:
    """The files `code_bytes` counts, sorted within each package."""
    repo = Path(__file__).parents[1]
    roots = [Path(root)] if root is not None else [repo / p for p in CODE_PACKAGES]
    excluded = [repo / p for p in NOT_COUNTED]
    return [p for r in roots for p in sorted(r.rglob("*.py"))
            if p.is_file() and not any(p.is_relative_to(x) for x in excluded)]


def artifact_budget_report(artifact_bytes: int, budget: int, code: int | None = None) -> dict:
    """Weights + code against the budget (decimal bytes, as the competition counts)."""
    code = code_bytes() if code is None else int(code)
    total = int(artifact_bytes) + code
    return {"weights_bytes": int(artifact_bytes), "code_bytes": code, "total_bytes": total,
            "budget_bytes": int(budget), "headroom_bytes": int(budget) - total, "fits": total <= budget}
