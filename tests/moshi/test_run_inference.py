"""python -m moshi.run_inference: Kyutai's flags, every checkpoint kind through the README command, output lengths,
transcripts on the 80 ms grid, and the clear outcomes for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moshi.run_inference import build_parser, main, read_input, words_of
from tests.helpers import checkpoints as ck

SR = 24000
FRAME = 1920

# Every option string of Kyutai's `moshi.run_inference` parser (moshi 0.2.13).
KYUTAI_OPTIONS = ["--tokenizer", "--moshi-weight", "--mimi-weight", "--hf-repo", "--batch-size", "--device", "--half",
                  "--config", "--lm-config", "--cfg-coef"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return ck.shared_base_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def lora_checkpoint(assets, tmp_path_factory) -> Path:
    return ck.write_moshi_export(tmp_path_factory.mktemp("lora_run") / "run", assets, ck.lora_lm(assets), "lora")


def _wav(path: Path, samples: int, sr: int = SR) -> Path:
    import sphn

    t = np.arange(samples) / sr
    pcm = (0.3 * np.sin(2 * np.pi * 440 * t) * (np.sin(2 * np.pi * 2 * t) > 0)).astype(np.float32)
    sphn.write_wav(str(path), pcm[None], sr)
    return path


def _grid_ok(words: list[dict], frame: float = 0.08) -> bool:
    times = [t for w in words for t in (w["start"], w["end"])]
    on_grid = all(abs(t / frame - round(t / frame)) < 1e-6 for t in times)
    monotone = all(a <= b for a, b in zip(times, times[1:])) and all(w["start"] < w["end"] for w in words)
    return on_grid and monotone


def test_every_kyutai_flag_is_accepted():
    parser = build_parser()
    ours = {s for action in parser._actions for s in action.option_strings}
    assert set(KYUTAI_OPTIONS) <= ours
    args = parser.parse_args(["in.wav", "out.wav", "--tokenizer", "t.model", "--moshi-weight", "m.safetensors",
                              "--mimi-weight", "mimi.safetensors", "--hf-repo", "repo", "--batch-size", "2",
                              "--device", "cpu", "--half", "--lm-config", "c.json", "--cfg-coef", "1.0"])
    assert (args.config, args.batch_size, args.half, args.cfg_coef) == ("c.json", 2, True, 1.0)
    defaults = parser.parse_args(["in.wav"])
    assert (defaults.outfile, defaults.device, defaults.batch_size, defaults.seed) == ("", "auto", 8, 4242)


def test_lora_checkpoint_through_the_readme_command(assets, lora_checkpoint, tmp_path, capsys):
    infile = _wav(tmp_path / "in.wav", 7 * FRAME + 700)  # a trailing partial frame
    out, transcript = tmp_path / "reply.wav", tmp_path / "reply.json"
    rc = main([str(infile), str(out), "--hf-repo", str(assets), "--checkpoint", str(lora_checkpoint),
               "--batch-size", "2", "--device", "cpu", "--extra-seconds", "0.2", "--transcript", str(transcript)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "ms/step" in printed and "real-time factor" in printed and "lora model on cpu (float32)" in printed
    for i in range(2):
        reply = read_input(tmp_path / f"reply-{i}.wav")
        assert len(reply) == 7 * FRAME + 700 + int(0.2 * SR)
    data = json.loads(transcript.read_text())
    assert data["kind"] == "lora" and [item["item"] for item in data["items"]] == [0, 1]
    for item in data["items"]:
        assert _grid_ok(item["words"])
        assert all(w["end"] <= (8 + 3) * 0.08 + 1e-9 for w in item["words"])


def test_seeded_items_are_reproducible_and_greedy_is_deterministic(assets, lora_checkpoint, tmp_path):
    infile = _wav(tmp_path / "in.wav", 5 * FRAME)
    common = [str(infile), "--hf-repo", str(assets), "--checkpoint", str(lora_checkpoint), "--device", "cpu",
              "--temp", "1.5", "--temp-text", "1.5"]
    assert main([*common, str(tmp_path / "a.wav"), "--batch-size", "2", "--seed", "7"]) == 0
    assert main([*common, str(tmp_path / "b.wav"), "--batch-size", "1", "--seed", "8"]) == 0
    # item 1 of the batch samples as the single run seeded 8; their audio agrees up to float32 rounding of the
    # batched Mimi and LM computations
    np.testing.assert_allclose(read_input(tmp_path / "a-1.wav"), read_input(tmp_path / "b.wav"), atol=1e-4)
    for name in ("g1.wav", "g2.wav"):
        assert main([*common, str(tmp_path / name), "--batch-size", "1", "--greedy"]) == 0
    assert np.array_equal(read_input(tmp_path / "g1.wav"), read_input(tmp_path / "g2.wav"))


def test_dsaa_checkpoint_through_the_readme_command(assets, tmp_path_factory, tmp_path, capsys):
    _, folder = ck.shared_dsaa_checkpoint(tmp_path_factory)
    infile = _wav(tmp_path / "in.wav", 6 * FRAME)
    transcript = tmp_path / "t.json"
    rc = main([str(infile), str(tmp_path / "out.wav"), "--hf-repo", str(assets), "--checkpoint", str(folder),
               "--batch-size", "1", "--device", "cpu", "--transcript", str(transcript)])
    assert rc == 0, capsys.readouterr()
    assert len(read_input(tmp_path / "out.wav")) == 6 * FRAME
    data = json.loads(transcript.read_text())
    assert data["kind"] == "dsaa" and _grid_ok(data["items"][0]["words"])


def test_16khz_input_is_resampled(assets, tmp_path):
    infile = _wav(tmp_path / "in16.wav", 16000, sr=16000)  # one second at 16 kHz
    pcm = read_input(infile)
    assert abs(len(pcm) - SR) <= 2  # resampled to 24 kHz
    out = tmp_path / "out.wav"
    assert main([str(infile), str(out), "--hf-repo", str(assets), "--batch-size", "1", "--device", "cpu"]) == 0
    assert len(read_input(out)) == len(pcm)


def test_unreadable_and_missing_inputs_are_clear_errors(assets, tmp_path, capsys):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF not really a wav")
    assert main([str(bad), "--hf-repo", str(assets), "--device", "cpu"]) == 2
    assert f"cannot read input audio {bad}" in capsys.readouterr().err
    assert main([str(tmp_path / "absent.wav"), "--hf-repo", str(assets), "--device", "cpu"]) == 2
    assert "input audio not found: " in capsys.readouterr().err
    infile = _wav(tmp_path / "in.wav", FRAME)
    assert main([str(infile), "--hf-repo", str(assets), "--device", "cpu", "--cfg-coef", "3"]) == 2
    assert "cfg_coef=3.0" in capsys.readouterr().err


def test_words_join_pieces_as_the_tokenizer_detokenises(assets):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(assets / "tokenizer.model"))
    # words whose pieces are all in the tiny vocabulary (its unknown id is 0, which is also EPAD)
    first, second = [w for w in ("alpha", "bravo", "echo", "golf", "hotel", "india", "kilo", "lima", "delta")
                     if 0 not in sp.encode(w)][:2]
    a, b = sp.encode(first), sp.encode(second)
    # frames: PAD, the first word's pieces, PAD, EPAD, the second word's pieces, ungenerated
    tokens = [3, *a, 3, 0, *b, -2]
    words = words_of(tokens, sp, skip={0, 3}, frame_rate=12.5)
    assert [w["word"] for w in words] == [first, second]
    a_end = 1 + len(a)
    assert words[0] == {"word": first, "start": 0.08, "end": round(a_end * 0.08, 6)}
    assert words[1] == {"word": second, "start": round((a_end + 2) * 0.08, 6), "end": round((a_end + 2 + len(b)) * 0.08, 6)}
    assert _grid_ok(words)
