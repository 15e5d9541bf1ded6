"""``manifest.jsonl``: one JSON line per input of a cohort run, and what makes an old result reusable.

While a run works, every rank appends a line per finished input to its own
part file ``.manifest.rank-R.jsonl`` (one ``write`` of a whole line on an
``O_APPEND`` file, then ``fsync``), so a killed run loses at most the input it
was working on. At the end rank 0 merges the parts into ``manifest.jsonl``
(written to a temporary name and renamed), keeping the latest line per input,
and the parts are removed. A run that finds parts left by a killed run reads
them like the manifest.

A line is reused (the input is *skipped*) when its status is done or skipped,
its ``settings_key`` equals the current one (command, output-changing
settings, weights SHA-256, softcli version) and every output it lists still
exists with the size it had.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import OutputError
from ..io.atomic import atomic_path
from ..io.hashing import weights_sha256  # noqa: F401  (re-exported: softcli.cohort.weights_sha256)
from ..io.inputs import json_safe

MANIFEST_NAME = "manifest.jsonl"
LOCK_NAME = ".soft-cohort.lock"
PART_PATTERN = re.compile(r"^\.manifest\.rank-(\d+)\.jsonl$")
REUSABLE = ("done", "skipped")


def part_path(out_dir: Path, rank: int) -> Path:
    return out_dir / f".manifest.rank-{rank}.jsonl"


def settings_key(command: str, settings: Mapping[str, Any], weights_hash: str) -> str:
    """What an output depends on, hashed: two runs with the same key write the same files."""
    doc = {"command": command, "settings": dict(settings), "weights_sha256": weights_hash,
           "softcli_version": __version__}
    return hashlib.sha256(json.dumps(json_safe(doc), sort_keys=True).encode()).hexdigest()


def input_key(path: str) -> str:
    """The manifest's identity of an input: its absolute path (``path`` in a record; ``input`` is as given)."""
    return os.path.abspath(path)


def record_key(rec: Mapping[str, Any]) -> str:
    path = rec.get("path")
    return path if isinstance(path, str) else input_key(rec["input"])


def append_line(path: Path, record: Mapping[str, Any]) -> None:
    """Append one record as one line with a single ``write`` and ``fsync`` (never a half line for readers)."""
    append_lines(path, [record])


def append_lines(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Append records, one line each, with a single ``write`` and one ``fsync``."""
    if not records:
        return
    data = "".join(json.dumps(json_safe(dict(r)), ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file; a torn or foreign line (a killed writer, a hand edit) is ignored."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("input"), str):
            records.append(rec)
    return records


def output_bytes(path: str | os.PathLike[str]) -> int:
    """The size of an output: a file's bytes, or the bytes of every file in a folder output (OME-Zarr).

    A folder output exists only once complete (written under a temporary name and renamed),
    so its files adding up to the recorded size means it is the one the manifest describes.
    """
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        return info.st_size

    def fail(exc: OSError) -> None:
        raise exc

    return sum(os.lstat(os.path.join(folder, name)).st_size
               for folder, _, names in os.walk(path, onerror=fail) for name in names)


def outputs_intact(record: Mapping[str, Any]) -> bool:
    """Every output the record lists exists with the size it had when written."""
    outputs = record.get("outputs")
    if not isinstance(outputs, list) or not outputs:
        return False
    for out in outputs:
        try:
            if output_bytes(out["path"]) != out["bytes"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


@contextlib.contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``DIR/.soft-cohort.lock`` (``flock``) for a run: two runs writing one manifest would lose lines."""
    import fcntl

    fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise OutputError(f"{out_dir}: another soft run (pid {holder}) is writing into this folder; "
                              "wait for it or use another `out_dir`") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class FailureCounter:
    """Failures recorded so far in the current run's part files (all ranks), reading only what was appended."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self._offsets: dict[Path, int] = {}
        self._failed = 0

    def __call__(self) -> int:
        for part in self.manifest.part_files():
            try:
                with open(part, "rb") as fh:
                    fh.seek(self._offsets.get(part, 0))
                    data = fh.read()
            except OSError:
                continue
            whole = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
            self._offsets[part] = self._offsets.get(part, 0) + len(whole)
            for line in whole.splitlines():
                try:
                    self._failed += json.loads(line).get("status") == "failed"
                except (ValueError, AttributeError):
                    continue
        return self._failed


class Manifest:
    """The manifest of one output folder: the merged file plus the part files of ranks."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / MANIFEST_NAME

    def part_files(self) -> list[Path]:
        try:
            names = sorted(os.listdir(self.out_dir))
        except OSError:
            return []
        return [self.out_dir / n for n in names if PART_PATTERN.match(n)]

    def records(self) -> list[dict[str, Any]]:
        """Every line of the manifest, then of any part files (later lines are newer)."""
        out = read_lines(self.path)
        for part in self.part_files():
            out += read_lines(part)
        return out

    def latest(self) -> dict[str, dict[str, Any]]:
        """The newest record of each input, by :func:`input_key`."""
        latest: dict[str, dict[str, Any]] = {}
        for rec in self.records():
            latest[record_key(rec)] = rec
        return latest

    def reusable(self, path: str, key: str, outputs: Sequence[str],
                 latest: Mapping[str, Mapping[str, Any]] | None = None) -> Mapping[str, Any] | None:
        """The record that lets ``path`` be skipped (same key, same outputs, intact), or None.

        ``latest``: :meth:`latest`, read once by a caller asking about many inputs.
        """
        rec = (self.latest() if latest is None else latest).get(input_key(path))
        return rec if rec is not None and self._matches(rec, key, outputs) else None

    @staticmethod
    def _matches(rec: Mapping[str, Any], key: str, outputs: Sequence[str]) -> bool:
        listed = [o.get("path") for o in rec.get("outputs") or [] if isinstance(o, dict)]
        return (rec.get("status") in REUSABLE and rec.get("settings_key") == key
                and [str(o) for o in outputs] == listed[: len(outputs)] and outputs_intact(rec))

    def merge(self, new_records: Sequence[Mapping[str, Any]], include_parts: bool = False) -> None:
        """Write ``manifest.jsonl`` = old lines updated by ``new_records`` (one line per input), atomically.

        ``include_parts``: also fold in the part files (those of a killed run).
        """
        merged: dict[str, dict[str, Any]] = {}
        old = self.records() if include_parts else read_lines(self.path)
        for rec in [*old, *new_records]:
            merged[record_key(rec)] = dict(rec)
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(json_safe(r), ensure_ascii=False) + "\n" for r in merged.values()),
                           encoding="utf-8")

    def remove_part(self, rank: int) -> None:
        try:
            os.unlink(part_path(self.out_dir, rank))
        except FileNotFoundError:
            pass
