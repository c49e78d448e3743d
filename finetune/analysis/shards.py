"""Per-frame tensors on disk: safetensors shards of whole batches plus one JSON manifest per rank.

A shard holds the rows (one per frame) of one or more whole batches: a float tensor per stream
(``[rows, dim]`` in the chosen dtype) and per-frame columns (file index, frame, time, text token, masks).
``manifest.rank{r}.json`` lists rank ``r``'s shards with the batch indices each holds, the file names the
``file`` column indexes and a header describing the extraction. The shard is renamed into place before the
manifest naming it is (atomically) rewritten, so after a crash the manifest lists exactly the batches that
are on disk: a resumed extraction skips those and redoes the rest, never duplicating or missing a batch. A
shard file the manifest does not list is overwritten by the resumed run.

A size budget caps the bytes of all shards of a rank; reaching it stops the extraction cleanly with the
manifest marked ``stopped: budget``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moshi.utils.atomic import atomic_save_safetensors, atomic_write_json

MANIFEST_VERSION = 1
MANIFEST_RE = re.compile(r"^manifest\.rank(\d+)\.json$")
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BudgetReached(RuntimeError):
    """The next shard would exceed the size budget; what was written stays valid."""


def storage_dtype(name: str) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` (also ``fp32``, ``bf16``, ``fp16``)."""
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    key = aliases.get(name, name)
    if key not in FLOAT_DTYPES:
        raise ValueError(f"unknown storage dtype {name!r} (use float32, bfloat16 or float16)")
    return FLOAT_DTYPES[key]


def manifest_path(folder: Path, rank: int) -> Path:
    return Path(folder) / f"manifest.rank{rank}.json"


class ShardWriter:
    """Buffers whole batches of rows and writes them as shards of about ``shard_bytes`` each.

    Args:
        folder: output folder (created).
        header: what was extracted and how (streams with their widths, model, data); a resumed run must
            give the same header, or the existing manifest is reported as belonging to another extraction.
        rank: this process's rank (shard and manifest names carry it).
        stream_dtype: dtype of the stream tensors on disk (per-frame columns keep their own).
        shard_bytes: a shard is written once the buffer holds at least this many bytes.
        budget_bytes: cap on the bytes of all of this rank's shards (None: no cap).
    """

    def __init__(
        self,
        folder: str | Path,
        header: Mapping[str, Any],
        *,
        rank: int = 0,
        stream_dtype: torch.dtype = torch.float32,
        shard_bytes: int = 256 << 20,
        budget_bytes: int | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.stream_dtype = stream_dtype
        self.shard_bytes = max(1, int(shard_bytes))
        self.budget_bytes = budget_bytes
        self.path = manifest_path(self.folder, rank)
        header = json.loads(json.dumps(dict(header)))
        if self.path.exists():
            self.manifest = read_manifest(self.path)
            if self.manifest["header"] != header:
                changed = sorted(k for k in set(header) | set(self.manifest["header"])
                                 if header.get(k) != self.manifest["header"].get(k))
                raise ValueError(
                    f"{self.path} belongs to another extraction (header keys differ: {', '.join(changed)}); "
                    "use a new --out folder or delete the old one"
                )
            self.manifest["complete"] = False
            self.manifest.pop("stopped", None)
        else:
            self.manifest = {"version": MANIFEST_VERSION, "rank": rank, "header": header, "files": [],
                             "shards": [], "complete": False}
        self._file_index = {name: i for i, name in enumerate(self.manifest["files"])}
        self._buffer: list[tuple[int, dict[str, torch.Tensor]]] = []
        self._buffered_bytes = 0

    @property
    def done_batches(self) -> set[int]:
        """Batch indices already on disk (listed by the manifest)."""
        return {b for shard in self.manifest["shards"] for b in shard["batches"]}

    @property
    def written_bytes(self) -> int:
        return sum(int(s["bytes"]) for s in self.manifest["shards"])

    def file_index(self, name: str) -> int:
        """Index of file ``name`` in this rank's file table (added on first use)."""
        if name not in self._file_index:
            self._file_index[name] = len(self.manifest["files"])
            self.manifest["files"].append(name)
        return self._file_index[name]

    def add(self, batch: int, rows: Mapping[str, torch.Tensor], streams: Sequence[str]) -> None:
        """Buffers one batch: ``rows`` maps column names to ``[rows, ...]`` tensors; those named in
        ``streams`` are stored in ``stream_dtype``. Writes a shard when the buffer is full.

        Raises:
            BudgetReached: writing the buffer would exceed the budget (nothing of the buffer is written).
        """
        if batch in self.done_batches or any(b == batch for b, _ in self._buffer):
            raise ValueError(f"batch {batch} is already stored (rank {self.rank})")
        n = {t.shape[0] for t in rows.values()}
        if len(n) != 1:
            raise ValueError(f"batch {batch}: columns have different row counts {sorted(n)}")
        stored = {
            k: (v.detach().to("cpu", self.stream_dtype) if k in streams else v.detach().cpu()).contiguous()
            for k, v in rows.items()
        }
        self._buffer.append((batch, stored))
        self._buffered_bytes += sum(t.numel() * t.element_size() for t in stored.values())
        if self._buffered_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Writes the buffered batches as one shard, then the manifest naming it."""
        if not self._buffer:
            return
        if self.budget_bytes is not None and self.written_bytes + self._buffered_bytes > self.budget_bytes:
            self._buffer.clear()
            self._buffered_bytes = 0
            self.manifest["stopped"] = "budget"
            atomic_write_json(self.path, self.manifest, indent=1)
            raise BudgetReached(
                f"rank {self.rank}: the next shard would exceed the budget of {self.budget_bytes} bytes "
                f"({self.written_bytes} written)"
            )
        columns = self._buffer[0][1].keys()
        tensors = {k: torch.cat([rows[k] for _, rows in self._buffer]) for k in columns}
        name = f"shard-r{self.rank:03d}-{len(self.manifest['shards']):05d}.safetensors"
        atomic_save_safetensors(self.folder / name, tensors)
        self.manifest["shards"].append({
            "file": name,
            "batches": [b for b, _ in self._buffer],
            "rows": int(next(iter(tensors.values())).shape[0]),
            "bytes": (self.folder / name).stat().st_size,
        })
        self._buffer.clear()
        self._buffered_bytes = 0
        atomic_write_json(self.path, self.manifest, indent=1)

    def finish(self, **summary: Any) -> dict[str, Any]:
        """Writes what is buffered and marks the manifest complete unless the budget stopped it (``summary``
        is recorded in it)."""
        self.flush()
        self.manifest["complete"] = "stopped" not in self.manifest
        self.manifest["summary"] = json.loads(json.dumps(summary))
        atomic_write_json(self.path, self.manifest, indent=1)
        return self.manifest


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: manifest version {manifest.get('version')!r}, expected {MANIFEST_VERSION}")
    return manifest


class ShardSet:
    """Every rank's shards of one extraction folder, read back with one global file table.

    ``file`` columns are remapped to indices into :attr:`files` (sorted names), so two extractions of the
    same data can be matched by ``(files[file], frame)``. Composite streams declared in the header
    (``composites: {name: [part, ...]}``) are concatenations of stored streams, built on read.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        paths = sorted(p for p in self.folder.glob("manifest.rank*.json") if MANIFEST_RE.match(p.name))
        if not paths:
            raise FileNotFoundError(f"{self.folder}: no manifest.rank*.json (not an extraction folder)")
        self.manifests = [read_manifest(p) for p in paths]
        self.header = self.manifests[0]["header"]
        for p, m in zip(paths, self.manifests):
            if m["header"] != self.header:
                raise ValueError(f"{p}: header differs from {paths[0].name} (ranks of different extractions)")
        self.files = sorted({f for m in self.manifests for f in m["files"]})
        index = {f: i for i, f in enumerate(self.files)}
        self._remap = [torch.tensor([index[f] for f in m["files"]] or [0], dtype=torch.long)
                       for m in self.manifests]
        self.complete = all(m.get("complete") for m in self.manifests)

    @property
    def streams(self) -> dict[str, dict[str, Any]]:
        """Stored streams: ``name -> {"dim": ..., ...}`` as the header describes them."""
        return dict(self.header.get("streams", {}))

    @property
    def composites(self) -> dict[str, list[str]]:
        return dict(self.header.get("composites", {}))

    @property
    def batches(self) -> list[tuple[int, int]]:
        """``(rank, batch)`` of every stored batch."""
        return [(m["rank"], b) for m in self.manifests for s in m["shards"] for b in s["batches"]]

    def __len__(self) -> int:
        return sum(len(m["shards"]) for m in self.manifests)

    def iter_shards(self, columns: Sequence[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Each shard as ``column -> tensor`` (``file`` remapped to :attr:`files`); composites on request."""
        for m, remap in zip(self.manifests, self._remap):
            for shard in m["shards"]:
                path = self.folder / shard["file"]
                if not path.exists():
                    raise FileNotFoundError(f"{path}: listed in manifest.rank{m['rank']}.json but missing")
                yield self._read(path, remap, columns)

    def _read(self, path: Path, remap: torch.Tensor, columns: Sequence[str] | None) -> dict[str, torch.Tensor]:
        composites = self.composites
        wanted = None if columns is None else list(columns)
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            stored = keys if wanted is None else {
                p for c in wanted for p in (composites.get(c, [c]))
            } | ({"file"} & keys)
            missing = stored - keys
            if missing:
                raise KeyError(f"{path}: no column(s) {sorted(missing)} (has {sorted(keys)})")
            out = {k: f.get_tensor(k) for k in stored}
        if "file" in out:
            out["file"] = remap[out["file"].long()]
        for name in wanted or []:
            if name in composites:
                out[name] = torch.cat([out[p] for p in composites[name]], dim=-1)
        return out

    def load(self, columns: Sequence[str]) -> dict[str, torch.Tensor]:
        """All rows of ``columns`` (plus ``file``) concatenated over shards."""
        parts = list(self.iter_shards(columns))
        if not parts:
            raise ValueError(f"{self.folder}: the extraction holds no shards")
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _keys(files: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    return files.long() * (1 << 32) + frames.long()


def iter_matched(
    a: ShardSet, b: ShardSet, a_columns: Sequence[str], b_columns: Sequence[str]
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]]:
    """Rows of ``a`` shard by shard with the rows of ``b`` for the same ``(file name, frame)``.

    Yields ``(rows_a, rows_b, unmatched)``: both restricted to the frames present in both folders, in ``a``'s
    order, and the number of ``a`` frames ``b`` lacks. Only ``b``'s frame keys are held in memory; ``b``'s
    shards are read as ``a``'s frames need them (the last one is kept, so aligned folders read each once).
    """
    index_of_a = {name: i for i, name in enumerate(a.files)}
    b_to_a = torch.tensor([index_of_a.get(name, -1) for name in b.files] or [0], dtype=torch.long)
    keys, shard_ids, row_ids = [], [], []
    locations = [(m, remap, s) for m, remap in zip(b.manifests, b._remap) for s in m["shards"]]
    for i, (_, remap, shard) in enumerate(locations):
        rows = b._read(b.folder / shard["file"], remap, ["frame"])
        keys.append(_keys(b_to_a[rows["file"]], rows["frame"]))
        shard_ids.append(torch.full_like(keys[-1], i))
        row_ids.append(torch.arange(len(keys[-1])))
    if not keys:
        raise ValueError(f"{b.folder}: the extraction holds no shards")
    all_keys = torch.cat(keys)
    order = torch.argsort(all_keys)
    sorted_keys, shard_of, row_of = all_keys[order], torch.cat(shard_ids)[order], torch.cat(row_ids)[order]
    if len(sorted_keys) > 1 and bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
        raise ValueError(f"{b.folder}: a (file, frame) appears twice; cannot match frames")
    cache: tuple[int, dict[str, torch.Tensor]] | None = None
    for rows_a in a.iter_shards([*a_columns, "frame"]):
        k = _keys(rows_a["file"], rows_a["frame"])
        pos = torch.searchsorted(sorted_keys, k).clamp_max(len(sorted_keys) - 1)
        found = sorted_keys[pos] == k
        pos = pos[found]
        parts: dict[str, list[torch.Tensor]] = {c: [] for c in b_columns}
        shards_needed = shard_of[pos]
        order_back = []
        for sid in torch.unique(shards_needed).tolist():
            sel = torch.nonzero(shards_needed == sid, as_tuple=True)[0]
            if cache is None or cache[0] != sid:
                _, remap, shard = locations[sid]
                cache = (sid, b._read(b.folder / shard["file"], remap, list(b_columns)))
            for c in b_columns:
                parts[c].append(cache[1][c][row_of[pos[sel]]])
            order_back.append(sel)
        if not order_back:
            yield {c: v[:0] for c, v in rows_a.items()}, {}, int((~found).sum())
            continue
        inverse = torch.argsort(torch.cat(order_back))
        rows_b = {c: torch.cat(v)[inverse] for c, v in parts.items()}
        yield {c: v[found] for c, v in rows_a.items()}, rows_b, int((~found).sum())
