"""finetune.data.check finds each planted fault of a broken dataset and passes a good one."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_tools.synth import SR, make_stereo, tone, words, write_manifest_lines

from finetune.data import check
from finetune.data.alignments import write_alignments
from finetune.data.audio import write_wav

GOOD_WORDS = words(("hello", 0.5, 0.9), ("there", 1.0, 1.6))


def _broken_dataset(root):
    """One fault per file (file name = the issue code expected), plus one good file."""
    lines = []

    def add(name, duration=2.0, manifest_duration=None, wav=True, alignments=GOOD_WORDS, raw_json=None, **kw):
        path = root / f"{name}.wav"
        if wav is True:
            make_stereo(path, duration=duration, **kw)
        elif wav is not None:
            write_wav(path, wav, kw.get("sr", SR))
        if raw_json is not None:
            path.with_suffix(".json").write_text(raw_json)
        elif alignments is not None:
            write_alignments(path.with_suffix(".json"), alignments)
        lines.append({"path": f"{name}.wav", "duration": manifest_duration or duration})

    add("ok")
    add("audio_missing", wav=None)
    add("not_stereo", wav=tone(2.0, [(0.4, 1.8)])[None])
    add("duration_mismatch", manifest_duration=2.5)
    add("alignment_missing", alignments=None)
    add("alignment_invalid", raw_json='{"alignments": [["a", [0.1], "SPEAKER_MAIN"]]}')
    add("words_unsorted", alignments=list(reversed(GOOD_WORDS)))
    add("words_after_end", alignments=GOOD_WORDS + words(("ghost", 4.0, 4.5)))
    add("words_past_end", alignments=GOOD_WORDS + words(("long", 1.8, 3.5)))
    add("empty_transcript", alignments=words(("hi", 0.2, 0.6), speaker="SPEAKER_OTHER"))
    add("silent_channel", right=())
    add("sample_rate", wav=np.stack([tone(2.0, [(0.4, 1.8)], sr=16000), tone(2.0, [(0.1, 0.3)], sr=16000)]), sr=16000)
    (root / "garbage.wav").write_bytes(b"\x01" * 3000)
    write_alignments(root / "garbage.json", GOOD_WORDS)
    lines.append({"path": "garbage.wav", "duration": 2.0})
    return write_manifest_lines(root / "broken.jsonl", lines)


def test_each_planted_fault_is_found_on_its_file_only(tmp_path):
    report = check.check_manifest(_broken_dataset(tmp_path), progress=False)
    found = {f.path.rsplit("/", 1)[1].removesuffix(".wav"): sorted(i.code for i in f.issues) for f in report.files}
    expected = {name: [name] for name in found if name not in ("ok", "garbage")}
    expected["ok"] = []
    expected["garbage"] = ["audio_unreadable"]
    assert found == expected
    by_name = {f.path.rsplit("/", 1)[1]: f for f in report.files}
    assert by_name["not_stereo.wav"].issues[0].message.startswith("1 channel(s)")
    assert "manifest says 2.500s, the file lasts 2.000s" in by_name["duration_mismatch.wav"].issues[0].message
    assert "channel right (user) RMS -120.0 dBFS" in by_name["silent_channel.wav"].issues[0].message
    assert by_name["ok.wav"].sample_rate == 24000 and by_name["sample_rate.wav"].sample_rate == 16000
    assert by_name["ok.wav"].where.endswith("broken.jsonl:1")


def test_exit_status_table_and_json_report(tmp_path, capsys):
    manifest = _broken_dataset(tmp_path)
    out = tmp_path / "report.json"
    assert check.main([str(manifest), "--json", str(out), "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert "13 files" in text and "not_stereo" in text and "FAIL" in text
    rep = json.loads(out.read_text())
    assert rep["summary"]["files"] == 13 and rep["summary"]["files_ok"] == 1
    assert rep["summary"]["issues"]["silent_channel"] == {"severity": "warning", "files": 1}
    assert rep["summary"]["issues"]["not_stereo"] == {"severity": "error", "files": 1}
    assert rep["summary"]["sample_rates"] == {"16000": 1, "24000": 10}


def test_good_dataset_passes(good_dataset, capsys):
    assert check.main([str(good_dataset), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "ok: 3" in text and "0 errors, 0 warnings -> OK" in text


def test_warnings_fail_only_with_strict(tmp_path):
    make_stereo(tmp_path / "a.wav", duration=2.0, right=())  # silent user channel: a warning
    write_alignments(tmp_path / "a.json", GOOD_WORDS)
    manifest = write_manifest_lines(tmp_path / "m.jsonl", [{"path": "a.wav", "duration": 2.0}])
    assert check.main([str(manifest), "--no-progress"]) == 0
    assert check.main([str(manifest), "--no-progress", "--strict"]) == 1
    # Header-only mode cannot see silence.
    assert check.main([str(manifest), "--no-progress", "--strict", "--no-audio-stats"]) == 0


def test_header_only_mode_still_finds_structure_faults(tmp_path):
    report = check.check_manifest(_broken_dataset(tmp_path), check.CheckOptions(audio_stats=False), progress=False)
    codes = {i.code for f in report.files for i in f.issues}
    assert codes == set(check.SEVERITY) - {"silent_channel", "duplicate_line"}


@pytest.mark.parametrize("content,code", [("not json\n", 2), ('{"path": "a.wav", "duration": -1}\n', 2)])
def test_unreadable_manifest_exits_2(tmp_path, content, code, capsys):
    (tmp_path / "m.jsonl").write_text(content)
    assert check.main([str(tmp_path / "m.jsonl"), "--no-progress"]) == code
    assert "m.jsonl:1" in capsys.readouterr().err
