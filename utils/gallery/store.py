"""The gallery index on disk: a JSON header and shards of features, each with its images' records.

A shard is ``shards/NNNNNNNN.json`` (the records) naming its ``.npy`` of features; it exists once
its JSON does. Every change writes new files under new names and then renames one JSON into place
(or deletes one), so a process killed at any moment leaves the index as it was before that step
or after it. Leftovers (temporary files, ``.npy`` files no JSON names) are removed by the next
writer; a record of an image that also appears in a later shard is out of date and ignored, and
dropped from its shard by the next writer.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from utils.base.errors import UserError
from utils.base.io import remove_temp_files, write_atomic, write_text_atomic

FORMAT = "cmnas-gallery-index"
VERSION = 1
HEADER = "index.json"
SHARDS = "shards"
# A shard's record columns in its JSON, and the Record fields they hold.
COLUMNS = ("paths", "resolved", "sizes", "mtimes_ns")
FIELDS = ("path", "resolved", "size", "mtime_ns")


@dataclass(frozen=True, slots=True)
class Record:
    """One indexed image: its path as listed when added, its absolute path (the key), its size
    and modification time when it was read."""

    path: str
    resolved: str
    size: int
    mtime_ns: int


@dataclass
class Shard:
    """One committed shard: its number (the order of shards), features file and records."""

    number: int
    features: str
    records: list[Record]


def stat_record(path: str, resolved: str) -> Record | None:
    """The record an image would get now, or None when it cannot be read from the disk."""
    try:
        status = os.stat(resolved)
    except OSError:
        return None
    return Record(path, resolved, status.st_size, status.st_mtime_ns)


class GalleryIndex:
    """A gallery index folder: its header (settings, modality, feature size) and its shards."""

    def __init__(self, folder: Path, header: dict[str, Any]) -> None:
        self.folder = folder
        self.header = header
        self.dim = int(header["dim"])
        self.last_number: int | None = None

    @property
    def shard_folder(self) -> Path:
        """Where the shards are."""
        return self.folder / SHARDS

    @classmethod
    def open(cls, folder: str | os.PathLike[str], flag: str = "--index") -> GalleryIndex:
        """The index in ``folder``; a UserError naming ``flag`` when there is none."""
        folder = Path(folder)
        try:
            header = json.loads((folder / HEADER).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{flag} {folder}: no gallery index here (no {HEADER})") from None
        except (OSError, ValueError) as err:
            raise UserError(f"{flag} {folder}: cannot read {HEADER} ({err})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise UserError(f"{flag} {folder}: {HEADER} is not a gallery index's header")
        if header.get("version") != VERSION:
            raise UserError(
                f"{flag} {folder}: index format version {header.get('version')}, this code "
                f"reads version {VERSION}"
            )
        return cls(folder, header)

    @classmethod
    def create(cls, folder: str | os.PathLike[str], header: dict[str, Any]) -> GalleryIndex:
        """A new, empty index in ``folder`` (which may exist, empty or holding a lock file)."""
        folder = Path(folder)
        (folder / SHARDS).mkdir(parents=True, exist_ok=True)
        header = {"format": FORMAT, "version": VERSION, **header}
        write_text_atomic(folder / HEADER, json.dumps(header, indent=1) + "\n")
        return cls(folder, header)

    def shards(self) -> list[Shard]:
        """The committed shards, oldest first."""
        found = []
        for path in sorted(self.shard_folder.glob("[0-9]*.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                columns = [data[name] for name in COLUMNS]
                records = [Record(*fields) for fields in zip(*columns, strict=True)]
                found.append(Shard(int(path.stem), data["features"], records))
            except FileNotFoundError:
                raise self.changed() from None
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise UserError(
                    f"--index {self.folder}: damaged shard {path.name} ({err})"
                ) from None
        return found

    def changed(self) -> UserError:
        """The error of a reader that found the index changing under it."""
        return UserError(
            f"--index {self.folder}: changed while being read (an add or remove is running); "
            "run again when it has finished"
        )

    def live(self, shards: Sequence[Shard]) -> list[list[int]]:
        """Per shard, the rows of its up-to-date records (an image's latest record wins)."""
        seen: set[str] = set()
        rows: list[list[int]] = []
        for shard in reversed(shards):
            kept = []
            for row in range(len(shard.records) - 1, -1, -1):
                key = shard.records[row].resolved
                if key not in seen:
                    seen.add(key)
                    kept.append(row)
            rows.append(kept[::-1])
        return rows[::-1]

    def records(self) -> list[Record]:
        """Every indexed image's record, in index order (shards, then rows)."""
        shards = self.shards()
        return [
            s.records[r] for s, rows in zip(shards, self.live(shards), strict=True) for r in rows
        ]

    def features_of(self, shard: Shard) -> np.ndarray:
        """A shard's features, memory-mapped, checked against its records."""
        path = self.shard_folder / shard.features
        try:
            features = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise self.changed() from None
        except (OSError, ValueError) as err:
            raise UserError(f"--index {self.folder}: damaged {shard.features} ({err})") from None
        if features.dtype != np.float32 or features.shape != (len(shard.records), self.dim):
            raise UserError(
                f"--index {self.folder}: {shard.features} holds {features.dtype} "
                f"{features.shape}, expected float32 ({len(shard.records)}, {self.dim})"
            )
        return features

    def load(self) -> tuple[list[Record], np.ndarray]:
        """Every record and its feature row, in index order, read into one array."""
        shards = self.shards()
        live = self.live(shards)
        records = [s.records[r] for s, rows in zip(shards, live, strict=True) for r in rows]
        features = np.empty((len(records), self.dim), dtype=np.float32)
        position = 0
        for shard, rows in zip(shards, live, strict=True):
            if len(rows) == len(shard.records):
                self.read_into(shard, features[position : position + len(rows)])
            elif rows:
                features[position : position + len(rows)] = self.features_of(shard)[rows]
            position += len(rows)
        return records, features

    def read_into(self, shard: Shard, out: np.ndarray) -> None:
        """Read all of a shard's features straight into ``out`` (no second copy in memory)."""
        self.features_of(shard)  # checks the file's header against the records
        try:
            with open(self.shard_folder / shard.features, "rb") as handle:
                if np.lib.format.read_magic(handle) == (1, 0):
                    np.lib.format.read_array_header_1_0(handle)
                else:
                    np.lib.format.read_array_header_2_0(handle)
                view, done = memoryview(out).cast("B"), 0
                while done < len(view):
                    read = handle.readinto(view[done:])
                    if not read:
                        raise ValueError("file ends early")
                    done += read
        except FileNotFoundError:
            raise self.changed() from None
        except (OSError, ValueError) as err:
            raise UserError(f"--index {self.folder}: damaged {shard.features} ({err})") from None

    def append(self, records: Sequence[Record], features: np.ndarray) -> int:
        """Commit one shard of ``records`` and their ``features`` rows; returns its number."""
        number = self.next_number()
        self.write_shard(number, records, [features])
        return number

    def next_number(self) -> int:
        """The number of the next shard (writers hold the lock: counted on from the first)."""
        if self.last_number is None:
            found = [int(p.stem) for p in self.shard_folder.glob("[0-9]*.json")]
            self.last_number = max(found, default=0)
        self.last_number += 1
        return self.last_number

    def write_shard(
        self, number: int, records: Sequence[Record], parts: Iterable[np.ndarray]
    ) -> None:
        """Write the features (``parts`` stacked, read one at a time), then the JSON that
        commits them."""
        name = f"{number:08d}-{uuid.uuid4().hex[:8]}.npy"

        def write(handle: Any) -> None:
            shape = (len(records), self.dim)
            np.lib.format.write_array_header_1_0(
                handle, {"descr": "<f4", "fortran_order": False, "shape": shape}
            )
            rows = 0
            for part in parts:
                handle.write(np.ascontiguousarray(part, dtype="<f4").tobytes())
                rows += len(part)
            if rows != len(records):
                raise ValueError(f"{len(records)} records for {rows} feature rows")

        write_atomic(self.shard_folder / name, write)
        columns = {
            key: [getattr(r, f) for r in records] for key, f in zip(COLUMNS, FIELDS, strict=True)
        }
        text = json.dumps({"features": name, **columns}, ensure_ascii=False)
        write_text_atomic(self.shard_folder / f"{number:08d}.json", text + "\n")

    def merge(self, numbers: Sequence[int]) -> None:
        """Replace the shards ``numbers`` (the latest ones) by one shard of their records."""
        shards = self.shards()
        chosen = [(s, rows) for s, rows in zip(shards, self.live(shards), strict=True)]
        chosen = [(s, rows) for s, rows in chosen if s.number in set(numbers)]
        if len(chosen) < 2:
            return
        records = [s.records[r] for s, rows in chosen for r in rows]
        parts = (self.features_of(shard)[rows] for shard, rows in chosen)
        self.write_shard(self.next_number(), records, parts)
        for shard, _ in chosen:
            self.delete(shard)

    def delete(self, shard: Shard) -> None:
        """Remove a shard: its JSON first, so a kill leaves at worst an unnamed ``.npy``."""
        (self.shard_folder / f"{shard.number:08d}.json").unlink(missing_ok=True)
        (self.shard_folder / shard.features).unlink(missing_ok=True)

    def keep_rows(self, shard: Shard, rows: list[int]) -> None:
        """Rewrite ``shard`` with only its ``rows`` (deleting it when none are left)."""
        if not rows:
            self.delete(shard)
            return
        features = self.features_of(shard)[rows]
        self.write_shard(shard.number, [shard.records[r] for r in rows], [features])
        (self.shard_folder / shard.features).unlink(missing_ok=True)

    def remove(self, drop: set[str]) -> int:
        """Drop the records whose absolute path is in ``drop``; returns how many were dropped."""
        dropped = 0
        for shard, rows in zip(*self._live_shards(), strict=True):
            kept = [r for r in rows if shard.records[r].resolved not in drop]
            dropped += len(rows) - len(kept)
            if len(kept) < len(shard.records):
                self.keep_rows(shard, kept)
        return dropped

    def tidy(self) -> None:
        """Writers only: remove leftovers of killed writes and out-of-date records."""
        remove_temp_files(self.folder)
        remove_temp_files(self.shard_folder)
        for shard, rows in zip(*self._live_shards(), strict=True):
            if len(rows) < len(shard.records):
                self.keep_rows(shard, rows)
        named = {shard.features for shard in self.shards()}
        for leftover in self.shard_folder.glob("*.npy"):
            if leftover.name not in named:
                leftover.unlink(missing_ok=True)

    def _live_shards(self) -> tuple[list[Shard], list[list[int]]]:
        shards = self.shards()
        return shards, self.live(shards)

    def disk_bytes(self) -> int:
        """The size of the index's files."""
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())
