"""Checked reading and streaming writing of safetensors files.

Reading goes through `safetensors.safe_open(framework="numpy")` (no device placement, one
tensor at a time) after a header check of our own, so a bad file gets an error that names the
file and the problem (Git-LFS pointer, truncation, unknown dtype) instead of `HeaderTooLarge`.

Writing plans the whole header first (names, dtypes, shapes are known before any data is read)
and then streams each tensor's bytes, so peak memory is one tensor, not one shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
from pathlib import Path
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

# safetensors dtype tag <-> numpy dtype, for the dtypes flaxflux reads or writes.
DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
}
TAGS: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_TAGS = ("BF16", "F16", "F32")
_LFS_MAGIC = b"version https://git-lfs"
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


class CheckpointError(ValueError):
    """A checkpoint file or folder is not what it should be; the message names file and tensor."""


def read_json(path: str | Path) -> dict:
    """A JSON object from a file, or a CheckpointError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Validate the framing of a safetensors file; return (tensor entries, __metadata__)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        if head.startswith(_LFS_MAGIC):
            raise CheckpointError(
                f"{path}: this is a Git-LFS pointer file ({size} bytes), not the weights; "
                "fetch the real file (git lfs pull, or download it again)")
        if size < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", head[:8])
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path}: header length {n} does not fit in the file's {size} bytes: "
                "truncated, or not a safetensors file")
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    end = 0
    for name, e in header.items():
        try:
            begin, stop = e["data_offsets"]
            dtype, shape = e["dtype"], e["shape"]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {e!r}") from err
        if dtype in DTYPES and (stop - begin) != DTYPES[dtype].itemsize * int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(f"{path}: tensor {name!r}: {stop - begin} bytes do not hold {dtype}{shape}")
        end = max(end, stop)
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "has trailing bytes"
        raise CheckpointError(
            f"{path}: file {what}: the header describes {8 + n + end} bytes, the file has {size} "
            "(an interrupted download or copy?)")
    return header, meta


class SafetensorsFile:
    """One validated safetensors file, read lazily tensor by tensor as numpy arrays.

    Tensors are read with positioned reads into fresh buffers rather than through safetensors'
    memory map: pages touched through a map count in the process's RSS until unmapped, so
    streaming a 10 GB shard that way grows RSS towards 10 GB; a read keeps one tensor resident.
    `safe_open` still checks the file once when it is opened."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries, self.metadata = read_header(self.path)
        with open(self.path, "rb") as f:
            self._data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        try:
            with safe_open(str(self.path), framework="numpy"):
                pass
        except SafetensorError as e:  # anything our own check did not already catch
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from e

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype_tag(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def nbytes(self, name: str) -> int:
        begin, stop = self.entries[name]["data_offsets"]
        return stop - begin

    def get(self, name: str) -> np.ndarray:
        tag = self.dtype_tag(name)
        if tag not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {tag} "
                                  f"(supported: {', '.join(DTYPES)})")
        begin, stop = self.entries[name]["data_offsets"]
        out = np.empty(self.shape(name), DTYPES[tag])
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._data_start + begin)
            got = 0
            while got < stop - begin:
                n = f.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{self.path}: tensor {name!r}: file ended early (truncated?)")
                got += n
        return out


class TensorReader:
    """Tensors spread over several safetensors files, looked up by name."""

    def __init__(self, files: Iterable[str | Path], strip: tuple[str, ...] = ()):
        self.files = [SafetensorsFile(p) for p in files]
        self._where: dict[str, tuple[SafetensorsFile, str]] = {}
        for f in self.files:
            for raw in f.keys():
                name = raw
                for p in strip:
                    if name.startswith(p):
                        name = name[len(p):]
                if name in self._where:
                    raise CheckpointError(f"tensor {name!r} is in both {self._where[name][0].path} and {f.path}")
                self._where[name] = (f, raw)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self._where[name][0].path

    def shape(self, name: str) -> tuple[int, ...]:
        f, raw = self._where[name]
        return f.shape(raw)

    def dtype_tag(self, name: str) -> str:
        f, raw = self._where[name]
        return f.dtype_tag(raw)

    def nbytes(self, name: str) -> int:
        f, raw = self._where[name]
        return f.nbytes(raw)

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} is missing from {', '.join(str(f.path) for f in self.files)}")
        f, raw = self._where[name]
        return f.get(raw)


def sharded_files(folder: Path, index_name: str, single_name: str) -> list[Path]:
    """The safetensors files of a (possibly sharded) HF component folder, checked against its index."""
    index = folder / index_name
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        files = [folder / s for s in shards]
        for f in files:
            listed = {k for k, v in weight_map.items() if v == f.name}
            present = set(read_header(f)[0])
            if listed != present:
                diff = sorted(listed ^ present)[:5]
                raise CheckpointError(f"{f}: its tensors do not match {index.name} (e.g. {diff})")
        return files
    if (folder / single_name).exists():
        return [folder / single_name]
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    raise CheckpointError(f"{folder}: neither {index_name} nor {single_name} found (safetensors present: {found})")


class _BackgroundSha256:
    """sha256 of a byte stream, computed on a worker thread (hashlib releases the GIL on large
    buffers), so hashing overlaps reading and writing. At most `depth` buffers wait in line,
    which bounds the extra memory to that many tensors."""

    def __init__(self, depth: int = 2):
        self._hash = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            try:
                self._hash.update(data)
            except BaseException as e:  # reported by hexdigest()
                self._error = e

    def update(self, data) -> None:
        self._queue.put(data)

    def hexdigest(self) -> str:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class SafetensorsWriter:
    """Writes one safetensors file whose tensors (name, dtype tag, shape) are known in advance.

    `write(name, array)` must follow the planned order; `close()` checks that all were written.
    Peak memory is the tensor being written."""

    def __init__(self, path: str | Path, plan: list[tuple[str, str, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._plan = []
        for name, tag, shape in plan:
            nbytes = DTYPES[tag].itemsize * int(np.prod(shape, dtype=np.int64))
            header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._plan.append((name, tag, tuple(shape)))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment
        self.nbytes = 8 + len(blob) + offset
        self._sha256 = _BackgroundSha256()  # of the whole file, computed while writing
        self.digest: str | None = None      # set by close()
        self._f = open(self.path, "wb")
        self._emit(struct.pack("<Q", len(blob)) + blob)
        self._next = 0

    def _emit(self, data) -> None:
        self._f.write(data)
        self._sha256.update(data)

    def write(self, name: str, array: np.ndarray) -> None:
        if self._next >= len(self._plan):
            raise CheckpointError(f"{self.path}: tensor {name!r} was not planned for this file")
        want, tag, shape = self._plan[self._next]
        if name != want:
            raise CheckpointError(f"{self.path}: expected tensor {want!r} next, got {name!r}")
        if array.dtype != DTYPES[tag] or tuple(array.shape) != shape:
            raise CheckpointError(f"{self.path}: tensor {name!r} is {array.dtype}{tuple(array.shape)}, "
                                  f"planned {tag}{shape}")
        self._emit(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._plan):
            self.abort()
            raise CheckpointError(f"{self.path}: only {self._next} of {len(self._plan)} planned tensors written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self.digest = self._sha256.hexdigest()

    def abort(self) -> None:
        self._f.close()
        self._sha256.stop()
