"""Streaming conversion into a flaxflux model folder: staging, sharded writing, manifest, summary.

Every component is written the same way: a plan of stored tensors (name, shape, dtype) made
before any data is read, shards whose headers are written first, then one tensor at a time
read -> (quantized) -> written. The folder is built in a temporary sibling of OUT and renamed
into place only when complete, so a failed or interrupted conversion leaves nothing at OUT.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from flaxflux.model_folder import (COMPONENT_CONFIG, FORMAT, FORMAT_VERSION, MANIFEST, ROOT_FILE, SHARD_INDEX,
                                   sha256_file)
from flaxflux.safetensors_io import DTYPES, CheckpointError, SafetensorsWriter

SHARD_BYTES = 2 * 1024**3  # shard size: bounded RSS does not depend on it (writes stream)


@dataclasses.dataclass
class Planned:
    name: str                  # stored tensor name
    tag: str                   # safetensors dtype tag
    shape: tuple[int, ...]
    source_bytes: int          # bytes of source read to make it (for progress and throughput)
    params: int                # logical parameters it holds (5 per byte for base-3 trits)

    @property
    def nbytes(self) -> int:
        return DTYPES[self.tag].itemsize * int(np.prod(self.shape, dtype=np.int64))


def shard_metadata(component: str, source_files: Iterable[Path], **extra: str) -> dict[str, str]:
    """The `__metadata__` of every shard flaxflux writes: format, version, component, and the
    source files' names and sizes (their sha256, hashed meanwhile on the other core, goes to
    flaxflux.json, written once the hashes are known)."""
    return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "component": component,
            "source_files": json.dumps({f.name: f.stat().st_size for f in source_files}), **extra}


@dataclasses.dataclass
class Prepared:
    """A component whose source is fully validated and whose output is planned; nothing of it is
    written yet. Converters prepare every component first, so a bad tensor anywhere in the
    source fails before any output exists, then `write` each one."""

    component: str                           # folder name in the output
    plan: list[Planned]
    produce: Callable[[Planned], np.ndarray]  # reads (and transforms) one planned tensor
    metadata: dict[str, str]                 # every shard's __metadata__
    config: dict                             # <component>/config.json
    files: list[Path]                        # source files read (progress total, provenance hashes)

    def write(self, staging: "Staging", progress: Callable[[int], None], summary: "Summary") -> None:
        write_component(staging, self.component, self.plan, self.produce, self.metadata, progress, summary)
        staging.write_json(f"{self.component}/{COMPONENT_CONFIG}", self.config)


@dataclasses.dataclass
class Summary:
    tensors: int = 0
    parameters: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    components: list[str] = dataclasses.field(default_factory=list)

    def lines(self) -> list[str]:
        ratio = self.bytes_in / max(self.bytes_out, 1)
        rate = self.bytes_in / max(self.seconds, 1e-9) / 1e6
        return [f"components: {', '.join(self.components)}",
                f"tensors: {self.tensors:,}   parameters: {self.parameters:,}",
                f"bytes in: {self.bytes_in / 1e9:.3f} GB   out: {self.bytes_out / 1e9:.3f} GB   "
                f"ratio: {ratio:.2f}x",
                f"time: {self.seconds:.1f} s   ({rate:.0f} MB/s of input)"]


class Staging:
    """A temporary sibling folder that becomes OUT on `commit()`, or vanishes on failure."""

    def __init__(self, out: Path, force: bool):
        self.out = Path(out)
        if self.out.exists() and not force:
            raise FileExistsError(f"{self.out} already exists; pass --force to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self.files: dict[str, dict] = {}   # relative path -> {"sha256", "bytes"}

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def add_file(self, rel: str, sha256: str, nbytes: int) -> None:
        self.files[rel] = {"sha256": sha256, "bytes": nbytes}

    def write_json(self, rel: str, obj: dict, manifest: bool = True) -> None:
        path = self.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2) + "\n")
        if manifest:
            self.add_file(rel, sha256_file(path), path.stat().st_size)

    def copy_file(self, src: Path, rel: str) -> None:
        dst = self.tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        self.add_file(rel, sha256_file(dst), dst.stat().st_size)

    def copy_tree(self, src: Path, rel: str) -> None:
        """Copy a small folder (tokenizer, scheduler) and list its files in the manifest."""
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            self.copy_file(f, f"{rel}/{f.relative_to(src).as_posix()}")

    def commit(self, root_info: dict) -> None:
        self.write_json(ROOT_FILE, {"format": FORMAT, "format_version": FORMAT_VERSION, **root_info})
        self.write_json(MANIFEST, {"files": dict(sorted(self.files.items()))}, manifest=False)
        for f in self.tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if self.out.exists():  # --force: move the old folder aside first, drop it after the swap
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)


def plan_shards(plan: list[Planned], limit: int = SHARD_BYTES) -> list[list[Planned]]:
    shards: list[list[Planned]] = [[]]
    size = 0
    for p in plan:
        if shards[-1] and size + p.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def write_component(staging: Staging, component: str, plan: list[Planned], produce: Callable[[Planned], np.ndarray],
                    metadata: dict[str, str], progress: Callable[[int], None], summary: Summary) -> None:
    """Write `plan` as sharded safetensors under `component/`, one tensor in memory at a time."""
    shards = plan_shards(plan)
    folder = staging.tmp / component
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    total = 0
    for k, shard in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        writer = SafetensorsWriter(folder / name, [(p.name, p.tag, p.shape) for p in shard], metadata)
        try:
            for p in shard:
                arr = produce(p)
                if arr.dtype != DTYPES[p.tag]:
                    arr = arr.astype(DTYPES[p.tag])
                writer.write(p.name, arr)
                weight_map[p.name] = name
                summary.tensors += 1
                summary.parameters += p.params
                summary.bytes_in += p.source_bytes
                progress(p.source_bytes)
                del arr
            writer.close()
        except BaseException:
            writer.abort()
            raise
        staging.add_file(f"{component}/{name}", writer.digest, writer.nbytes)
        total += writer.nbytes
    summary.bytes_out += total
    staging.write_json(f"{component}/{SHARD_INDEX}", {"metadata": {"total_size": total}, "weight_map": weight_map})


class FileHasher:
    """sha256 of source files on a background thread (hashlib releases the GIL on large
    blocks), so provenance costs the second core instead of wall time. Results are keyed by
    the path relative to `base` (components of a snapshot reuse names like model.safetensors),
    or by the file name without one."""

    def __init__(self, files: Iterable[Path], base: Path | None = None):
        self.files = sorted({Path(f) for f in files})
        self.base = base
        self.result: dict[str, str] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for f in self.files:
                key = f.relative_to(self.base).as_posix() if self.base is not None else f.name
                self.result[key] = sha256_file(f)
        except BaseException as e:  # reported by join()
            self._error = e

    def join(self) -> dict[str, str]:
        self._thread.join()
        if self._error is not None:
            raise CheckpointError(f"hashing source files failed: {self._error}")
        return self.result


def timer() -> Callable[[], float]:
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0
