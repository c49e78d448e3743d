"""Shards and manifests: round trip, file tables over ranks, budget, resume bookkeeping, composites."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.analysis.shards import BudgetReached, ShardSet, ShardWriter, storage_dtype

HEADER = {"streams": {"s": {"dim": 3}, "t": {"dim": 2}}, "composites": {"st": ["s", "t"]}}


def _rows(writer: ShardWriter, batch: int, files: list[str], n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    return {
        "file": torch.tensor([writer.file_index(files[i % len(files)]) for i in range(n)], dtype=torch.int32),
        "frame": torch.arange(n, dtype=torch.int32) + 10 * batch,
        "s": torch.randn(n, 3, generator=g),
        "t": torch.randn(n, 2, generator=g),
    }


def test_round_trip_with_dtype_ranks_and_composites(tmp_path):
    expected = {}
    for rank, files in ((0, ["b.wav", "a.wav"]), (1, ["c.wav", "a.wav"])):
        w = ShardWriter(tmp_path, HEADER, rank=rank, stream_dtype=torch.bfloat16, shard_bytes=100)
        for b in range(3):
            rows = _rows(w, b, files)
            expected[(rank, b)] = (rows, [files[i % 2] for i in range(4)])
            w.add(b, rows, ["s", "t"])
        w.finish(note="done")
    shards = ShardSet(tmp_path)
    assert shards.complete and shards.files == ["a.wav", "b.wav", "c.wav"]
    assert sorted(shards.batches) == [(r, b) for r in (0, 1) for b in range(3)]
    got = shards.load(["s", "t", "st", "frame"])
    assert got["s"].dtype == torch.bfloat16 and got["frame"].dtype == torch.int32
    want_s = torch.cat([expected[(r, b)][0]["s"] for r in (0, 1) for b in range(3)])
    torch.testing.assert_close(got["s"], want_s.to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(got["st"], torch.cat([got["s"], got["t"]], dim=1), rtol=0, atol=0)
    names = [shards.files[i] for i in got["file"].tolist()]
    assert names == [f for r in (0, 1) for b in range(3) for f in expected[(r, b)][1]]


def test_budget_stops_cleanly_and_the_written_shards_stay_valid(tmp_path):
    w = ShardWriter(tmp_path, HEADER, shard_bytes=1, budget_bytes=2500)
    with pytest.raises(BudgetReached):
        for b in range(100):
            w.add(b, _rows(w, b, ["x"]), ["s", "t"])
    manifest = json.loads((tmp_path / "manifest.rank0.json").read_text())
    assert manifest["stopped"] == "budget" and not manifest["complete"]
    assert 0 < len(manifest["shards"]) < 100
    assert sum(s["bytes"] for s in manifest["shards"]) <= 2500
    assert len(ShardSet(tmp_path).load(["s"])["s"]) == 4 * len(manifest["shards"])


def test_reopening_continues_after_the_listed_batches_and_rejects_another_header(tmp_path):
    w = ShardWriter(tmp_path, HEADER, shard_bytes=1)
    for b in range(2):
        w.add(b, _rows(w, b, ["x"]), ["s", "t"])
    w.add(2, _rows(w, 2, ["x"]), ["s", "t"])  # written: shard_bytes=1 flushes every batch
    again = ShardWriter(tmp_path, HEADER, shard_bytes=1)
    assert again.done_batches == {0, 1, 2}
    with pytest.raises(ValueError, match="already stored"):
        again.add(1, _rows(again, 1, ["x"]), ["s", "t"])
    with pytest.raises(ValueError, match="another extraction .*streams"):
        ShardWriter(tmp_path, {**HEADER, "streams": {"s": {"dim": 4}}})


def test_storage_dtype_names_and_missing_folder(tmp_path):
    assert storage_dtype("fp16") is torch.float16 and storage_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown storage dtype"):
        storage_dtype("int8")
    with pytest.raises(FileNotFoundError, match="not an extraction folder"):
        ShardSet(tmp_path)


def test_frames_of_two_extractions_match_by_file_name_and_frame(tmp_path):
    from finetune.analysis.shards import iter_matched

    def write(folder, order, files, rank_split):
        for rank, batches in enumerate(rank_split):
            w = ShardWriter(folder, HEADER, rank=rank, shard_bytes=1)
            for b in batches:
                names = [files[(b + i) % len(files)] for i in range(3)]
                frames = torch.tensor([order * 0 + 10 * b + i for i in range(3)], dtype=torch.int32)
                value = torch.tensor([[hash((n, int(f))) % 1000] for n, f in zip(names, frames)], dtype=torch.float32)
                w.add(b, {"file": torch.tensor([w.file_index(n) for n in names], dtype=torch.int32),
                          "frame": frames, "s": value.expand(3, 3).contiguous(), "t": value.expand(3, 2).contiguous()},
                      ["s", "t"])
            w.finish()

    files = ["x.wav", "y.wav", "z.wav"]
    write(tmp_path / "a", 0, files, [[0, 1, 2, 3]])
    write(tmp_path / "b", 0, list(reversed(files)), [[3, 1], [0]])  # other ranks, other file tables, no batch 2
    a, b = ShardSet(tmp_path / "a"), ShardSet(tmp_path / "b")
    total, missing = 0, 0
    for rows_a, rows_b, unmatched in iter_matched(a, b, ["s"], ["s"]):
        missing += unmatched
        if rows_b:
            total += len(rows_a["s"])
            names_a = [a.files[i] for i in rows_a["file"].tolist()]
            expected = torch.tensor([[hash((n, int(f))) % 1000] for n, f in zip(names_a, rows_a["frame"])],
                                    dtype=torch.float32)
            torch.testing.assert_close(rows_b["s"][:, :1], expected, rtol=0, atol=0)
    # b holds y/x/z files reversed: the same names at different frames do not match
    assert total + missing == 12 and missing > 0
