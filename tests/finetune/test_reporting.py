"""The shared writers of scripts: strict JSON, CSV with ragged rows, PNG, digests that track content."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest

from finetune.reporting import (
    add_common_arguments,
    file_digest,
    folder_digest,
    provenance,
    pyplot,
    save_figure,
    write_csv,
    write_json,
)


def test_write_json_is_strict_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = write_json(tmp_path / "sub" / "r.json", {"acc": float("nan"), "p": Path("/x"), "v": [1.5, float("inf")]})
    assert json.loads(path.read_text()) == {"acc": None, "p": "/x", "v": [1.5, None]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]


def test_write_json_refuses_unknown_objects_without_touching_the_old_file(tmp_path: Path) -> None:
    path = write_json(tmp_path / "r.json", {"a": 1})
    with pytest.raises(TypeError, match="object"):
        write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}


def test_write_csv_unions_columns_in_first_seen_order(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", [{"a": 1, "b": 2}, {"c": 3, "a": 4}])
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows == [["a", "b", "c"], ["1", "2", ""], ["4", "", "3"]]


def test_save_figure_writes_a_png(tmp_path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.get_fignums()


def test_folder_digest_follows_content_and_names_not_location(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "x").mkdir(parents=True)
        (root / "x" / "1.txt").write_text("one")
        (root / "2.txt").write_text("two")
    assert folder_digest([a]) == folder_digest([b])
    (b / "2.txt").write_text("TWO")
    assert folder_digest([a]) != folder_digest([b])
    (b / "2.txt").write_text("two")
    (b / "2.txt").rename(b / "3.txt")
    assert folder_digest([a]) != folder_digest([b])
    assert file_digest(a / "2.txt") == "sha256:3fc4ccfe745870e2c0d99f71f30ff0656c8dedd41cc1d7d3d376b0dbe685e2f3"


def test_provenance_records_digests_and_extra(tmp_path: Path) -> None:
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"weights")
    p = provenance(checkpoints=[w], datasets=[tmp_path / "w.safetensors"], extra={"protocol": "standard"})
    assert p["checkpoints"] == {str(w): folder_digest([w])}
    assert p["dataset_digest"] == folder_digest([w])
    assert p["protocol"] == "standard"
    assert p["code_version"]


def test_common_arguments_default_to_auto_and_require_out() -> None:
    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    args = parser.parse_args(["--out", "o"])
    assert (args.device, args.dtype, args.out, args.seed) == ("auto", "auto", Path("o"), 0)
    with pytest.raises(SystemExit):
        parser.parse_args([])
