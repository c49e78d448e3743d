"""`metrics.{tag}.jsonl`: whole records, one write each; a torn last line does not block a resume."""

from __future__ import annotations

import json
import logging
import os

import pytest

from finetune.monitoring import metrics_logger as ml
from finetune.monitoring.metrics_logger import MetricsFileError, MetricsLogger


def _steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_torn_last_line_is_dropped_with_a_warning_naming_the_file(tmp_path, caplog):
    m = MetricsLogger(tmp_path, "train", is_main=True)
    for step in (1, 2, 3):
        m.log({"loss": 1.0 / step}, step)
    with open(m.path, "a") as f:
        f.write('{"loss": 0.2, "st')  # a kill or a full disk in the middle of record 4
    with caplog.at_level(logging.WARNING):
        m.truncate_after(2)
    assert _steps(m.path) == [1, 2]
    assert f"{m.path}:4: dropping a partly written last record" in caplog.text
    m.log({"loss": 0.3}, 3)  # the resumed run appends whole lines again
    assert _steps(m.path) == [1, 2, 3]


def test_a_damaged_line_before_the_end_is_named(tmp_path):
    m = MetricsLogger(tmp_path, "train", is_main=True)
    m.log({"loss": 1.0}, 1)
    with open(m.path, "a") as f:
        f.write("garbage\n")
    m.log({"loss": 1.0}, 2)
    with pytest.raises(MetricsFileError, match=rf"{m.path}:2: not a metrics record"):
        m.truncate_after(2)


def test_each_record_is_one_write_call(tmp_path, monkeypatch):
    calls = []
    real = os.write

    def counting(fd, data):
        calls.append(bytes(data))
        return real(fd, data)

    monkeypatch.setattr(ml.os, "write", counting)
    m = MetricsLogger(tmp_path, "train", is_main=True)
    m.log({"loss": 1.5, "text": "x" * 20000}, 7)  # larger than any stdio buffer
    assert len(calls) == 1 and calls[0].endswith(b"\n") and json.loads(calls[0])["step"] == 7


def test_flush_syncs_the_file(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(ml.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    m = MetricsLogger(tmp_path, "train", is_main=True)
    m.flush()  # nothing logged yet: nothing to sync
    m.log({"loss": 1.0}, 1)
    m.flush()
    assert len(synced) == 1
