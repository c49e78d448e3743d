"""scripts/build_eval_set.py: released sLM21, indexed (StoryCloze) and pair folders round-trip into our layout."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from finetune.data.alignments import load_alignments
from finetune.data.audio import read_audio, write_wav
from finetune.data.manifest import read_manifest
from finetune.eval_sets.layout import BuildOptions, build_pair_set
from finetune.eval_sets.sources import SourcePair, read_slm21
from finetune.evaluation.layout import EvalSetError, read_pair_set
from tests.helpers.scripts import load_script

SR_IN = 16_000


def mono(path: Path, n: int, seed: int, sr: int = SR_IN) -> Path:
    """A distinct short signal per seed: a sine of its own frequency plus a little noise."""
    t = np.arange(n) / sr
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * (200 + 37 * seed) * t) + 0.01 * rng.standard_normal(n)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_wav(path, x[None].astype(np.float32), sr)
    return path


def write_gold(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


LEX_COLUMNS = ["filename", "voice", "frequency", "word", "phones", "length", "correct", "id"]


def lexical_folder(root: Path) -> tuple[Path, list[dict]]:
    """Three word/non-word ids x two voices, rows shuffled so gold order is not pair order; 16 kHz wavs."""
    rows = []
    freqs = {"1": "0", "2": "3", "3": "150"}
    for k, (pid, voice) in enumerate([(i, v) for i in ("1", "2", "3") for v in ("Alex", "Bea")]):
        for correct in (1, 0):
            stem = f"f{pid}{voice[0]}{correct}"
            n = 1600 + 160 * k + 80 * correct  # every file its own length
            mono(root / f"{stem}.wav", n, seed=len(rows))
            rows.append({"filename": stem, "voice": voice, "frequency": freqs[pid] if correct else "",
                         "word": f"w{pid}" if correct else f"nw{pid}", "phones": "a b", "length": "2",
                         "correct": str(correct), "id": pid, "_n": n})
    order = [3, 0, 7, 10, 1, 5, 2, 11, 4, 9, 6, 8]
    rows = [rows[i] for i in order]
    write_gold(root / "gold.csv", LEX_COLUMNS, [{k: v for k, v in r.items() if k != "_n"} for r in rows])
    return root, rows


def load_set(out: Path) -> tuple[list, list[dict], dict[str, dict[str, dict]], dict]:
    """Manifest entries, extra.txt lines, side-map rows as {pair_id: {role: row}} (in pair order), build.json."""
    entries = read_manifest(out / "data.jsonl")
    extra = [json.loads(line) for line in (out / "extra.txt").read_text().splitlines()]
    with open(out / "side_map.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["file_index"]) for r in rows] == list(range(len(rows)))
    pairs: dict[str, dict[str, dict]] = {}
    for r in rows:
        pairs.setdefault(r["pair_id"], {})[r["role"]] = r
    return entries, extra, pairs, json.loads((out / "build.json").read_text())


def test_slm21_lexical_round_trip(tmp_path: Path) -> None:
    src, rows = lexical_folder(tmp_path / "lexical" / "dev")
    out = tmp_path / "swuggy"
    build = load_script("build_eval_set")
    assert build.main(["slm21", str(src), "--out", str(out), "--no-progress", "--seed", "3"]) == 0
    entries, extra, pairs, info = load_set(out)

    assert [e.path for e in entries] == [out / "data_stereo" / f"{n}.wav" for n in range(12)]
    assert extra == [{"file_index": n, "number": e["number"]} for n, e in enumerate(extra)]
    assert info["source"]["task"] == "lexical" and info["channel"] == "moshi" and info["pairs"] == 6
    by_stem = {r["filename"]: r for r in rows}
    first_seen = list(dict.fromkeys(f"{r['id']}/{r['voice']}" for r in rows))  # pairs in gold order
    assert list(pairs) == first_seen and len(first_seen) == 6
    orders = set()
    for i, (pair_id, pair) in enumerate(pairs.items()):
        pos, neg = int(pair["positive"]["file_index"]), int(pair["negative"]["file_index"])
        assert {pos, neg} == {2 * i, 2 * i + 1}
        orders.add(pos < neg)
        assert extra[pos]["number"] == 1 and extra[neg]["number"] == 0
        pos_row, neg_row = by_stem[pair["positive"]["source"]], by_stem[pair["negative"]["source"]]
        assert (pos_row["correct"], neg_row["correct"]) == ("1", "0")
        assert pair_id == f"{pos_row['id']}/{pos_row['voice']}" == f"{neg_row['id']}/{neg_row['voice']}"
        for role, row in (("positive", pos_row), ("negative", neg_row)):
            side = pair[role]
            assert (side["id"], side["voice"], side["word"]) == (row["id"], row["voice"], row["word"])
            assert side["frequency"] == pos_row["frequency"]  # the word's count, on both rows of the pair
        for index, row in ((pos, pos_row), (neg, neg_row)):
            wav, sr = read_audio(out / "data_stereo" / f"{index}.wav")
            assert sr == 24_000 and wav.shape == (2, row["_n"] * 3 // 2)  # 16 -> 24 kHz: floor(n * 3 / 2)
            assert np.abs(wav[0]).max() > 0.1 and np.all(wav[1] == 0)  # item left, digital silence right
            assert entries[index].duration == pytest.approx(row["_n"] * 1.5 / 24_000)
            assert json.loads((out / "data_stereo" / f"{index}.json").read_text()) == {"alignments": []}
    assert orders == {True, False}  # the seeded random order puts positives on both stems

    # The evaluation's reader pairs the built set by the side map's pair ids, with sWUGGY's groupings.
    read = {p.item_id: p for p in read_pair_set(out).pairs}
    assert sorted(read) == sorted(pairs)
    for pair_id, pair in pairs.items():
        got = read[pair_id]
        assert (got.positive, got.negative) == (int(pair["positive"]["file_index"]), int(pair["negative"]["file_index"]))
        band = {"0": "oov", "3": "1-5", "150": ">100"}[pair["positive"]["frequency"]]
        assert (got.groups["frequency_band"], got.groups["in_vocab"]) == (band, "false" if band == "oov" else "true")
    assert sorted(p.name for p in out.iterdir()) == ["build.json", "data.jsonl", "data_stereo", "extra.txt",
                                                     "side_map.csv"]


def test_slm21_syntactic_groups_and_user_channel(tmp_path: Path) -> None:
    root = tmp_path / "syntactic" / "dev"
    columns = ["filename", "voice", "type", "subtype", "transcription", "correct", "id"]
    rows = []
    for k, (typ, sub) in enumerate([("agreement", "a1"), ("binding", "b1")]):
        for correct in (1, 0):
            mono(root / f"s{k}{correct}.wav", 2000 + 100 * correct, seed=k * 2 + correct)
            rows.append({"filename": f"s{k}{correct}", "voice": "V", "type": typ, "subtype": sub,
                         "transcription": f"sent {k} {correct}", "correct": correct, "id": "7"})
    write_gold(root / "gold.csv", columns, rows)
    out = tmp_path / "sblimp"
    build = load_script("build_eval_set")
    build.main(["slm21", str(root), "--out", str(out), "--no-progress", "--channel", "user",
                "--order", "negative-first"])
    _, extra, pairs, info = load_set(out)
    assert info["source"]["task"] == "syntactic" and info["channel"] == "user"
    assert list(pairs) == ["agreement/a1/7/V", "binding/b1/7/V"]
    assert [(p["negative"]["type"], p["positive"]["subtype"]) for p in pairs.values()] == [("agreement", "a1"),
                                                                                         ("binding", "b1")]
    assert [e["number"] for e in extra] == [0, 1, 0, 1]
    wav, _ = read_audio(out / "data_stereo" / "0.wav")
    assert np.all(wav[0] == 0) and np.abs(wav[1]).max() > 0.1


def test_indexed_storycloze_and_pair_folders(tmp_path: Path) -> None:
    sc = tmp_path / "sSC"
    for i in range(6):  # 0/1, 2/3, 4/5; 10 would sort after 9 as text, the integer sort keeps pairs intact
        mono(sc / f"{i if i < 4 else i + 6}_story.wav", 1600 + 10 * i, seed=i)
    build = load_script("build_eval_set")
    build.main(["indexed", str(sc), "--out", str(tmp_path / "ssc"), "--no-progress", "--order", "positive-first"])
    _, extra, pairs, _ = load_set(tmp_path / "ssc")
    assert list(pairs) == ["0", "2", "10"]
    assert [p["negative"]["source"] for p in pairs.values()] == ["1_story", "3_story", "11_story"]
    assert [e["number"] for e in extra] == [1, 0, 1, 0, 1, 0]

    pf = tmp_path / "cd"
    for i, name in enumerate(["b", "a", "spk/c"]):
        mono(pf / "positive" / f"{name}.wav", 800, seed=i)
        mono(pf / "negative" / f"{name}.wav", 1200, seed=10 + i, sr=24_000)
    build.main(["pairs", str(pf), "--out", str(tmp_path / "cd_set"), "--no-progress"])
    entries, _, pairs, _ = load_set(tmp_path / "cd_set")
    assert list(pairs) == ["a", "b", "spk/c"]
    assert pairs["spk/c"]["negative"]["source"] == "negative/spk/c"
    for p in pairs.values():
        assert entries[int(p["positive"]["file_index"])].duration == pytest.approx(800 * 1.5 / 24_000)
        assert entries[int(p["negative"]["file_index"])].duration == pytest.approx(1200 / 24_000)


def test_inconsistent_sources_raise_naming_the_file(tmp_path: Path) -> None:
    src, rows = lexical_folder(tmp_path / "lex")
    gold = src / "gold.csv"
    lines = gold.read_text().splitlines()
    # Flip a negative to positive: its (id, voice) now has two positives and no negative.
    flipped = next(i for i, line in enumerate(lines) if line.startswith("f1A0"))
    lines[flipped] = lines[flipped].replace(",0,1", ",1,1")
    gold.write_text("\n".join(lines) + "\n")
    with pytest.raises(EvalSetError, match=rf"gold.csv:{flipped + 1}: a second row with correct=1"):
        read_slm21(src)

    src2, _ = lexical_folder(tmp_path / "lex2")
    (src2 / "f2B1.wav").unlink()
    with pytest.raises(EvalSetError, match=r"gold.csv:\d+: audio file .*f2B1.wav not found"):
        read_slm21(src2)

    src3, _ = lexical_folder(tmp_path / "lex3")
    mono(src3 / "stray.wav", 100, seed=1)
    with pytest.raises(EvalSetError, match="not listed.*stray.wav"):
        read_slm21(src3)

    pf = tmp_path / "cd"
    mono(pf / "positive" / "x.wav", 800, seed=1)
    (pf / "negative").mkdir()
    with pytest.raises(EvalSetError, match=r"positive/x.wav: no negative partner"):
        load_script("build_eval_set").main(["pairs", str(pf), "--out", str(tmp_path / "o"), "--no-progress"])

    long = SourcePair("p", mono(tmp_path / "long.wav", 32_000, seed=2), mono(tmp_path / "short.wav", 800, seed=3))
    out = tmp_path / "refused"
    with pytest.raises(EvalSetError, match=r"long.wav: 2.00 s, longer than the 1.5 s limit"):
        build_pair_set([long], out, BuildOptions(max_duration=1.5), tmp_path, {}, progress=False)
    assert not out.exists()  # nothing half-written

    stereo = tmp_path / "stereo.wav"
    write_wav(stereo, np.zeros((2, 100), dtype=np.float32), SR_IN)
    with pytest.raises(EvalSetError, match="stereo.wav: expected mono"):
        build_pair_set([SourcePair("s", stereo, tmp_path / "short.wav")], out, BuildOptions(), tmp_path, {},
                       progress=False)


@pytest.mark.slow
def test_annotate_runs_before_the_folder_appears(tmp_path: Path, tiny_whisper: Path) -> None:
    pf = tmp_path / "cd"
    mono(pf / "positive" / "x.wav", 16_000, seed=1)
    mono(pf / "negative" / "x.wav", 12_000, seed=2)
    out = tmp_path / "cd_set"
    options = (f"--whisper_model {tiny_whisper} --device cpu --beam_size 1 --best_of 1 --temperature 0 "
               "--max_tokens 4 --vad none --no-progress")
    build = load_script("build_eval_set")
    assert build.main(["pairs", str(pf), "--out", str(out), "--no-progress", "--annotate",
                       "--annotate-options", options]) == 0
    for n, seconds in enumerate(json.loads(line)["duration"] for line in (out / "data.jsonl").read_text().splitlines()):
        words = load_alignments(out / "data_stereo" / f"{n}.json", duration=seconds)  # written by annotate.py
        assert all(w.speaker == "SPEAKER_MAIN" for w in words)
    assert json.loads((out / "build.json").read_text())["alignments"] == "annotated"



def test_a_failing_finalize_leaves_nothing(tmp_path: Path) -> None:
    pair = SourcePair("p", mono(tmp_path / "a.wav", 800, seed=1), mono(tmp_path / "b.wav", 800, seed=2))
    seen = []

    def fail(folder: Path) -> None:
        seen.append(sorted(p.name for p in folder.iterdir()))
        raise EvalSetError("annotate.py failed")

    with pytest.raises(EvalSetError, match="annotate.py failed"):
        build_pair_set([pair], tmp_path / "out", BuildOptions(), tmp_path, {}, progress=False, finalize=fail)
    assert seen == [["build.json", "data.jsonl", "data_stereo", "extra.txt", "side_map.csv"]]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
