"""Text-row placement (word selection, tokenizing, EPAD, collisions, chunk end).

A fake tokenizer gives fixed ids.
"""

from __future__ import annotations

import numpy as np
import pytest

from finetune.data.alignments import AlignedWord
from finetune.data.chunks import chunk_offsets, num_frames, start_frame
from finetune.data.interleaver import (
    CHUNK_END,
    COLLISION,
    OTHER_SPEAKER,
    STARTED_BEFORE,
    ZERO_DURATION,
    Interleaver,
    InterleaverStats,
)
from finetune.data.text_tokenizer import SentencePieceTextTokenizer

PAD, EPAD = 3, 0


class FakeTokenizer:
    pad_id, epad_id, initial_id = PAD, EPAD, 32000
    vocab_size = 32000

    def __init__(self, table: dict[str, list[int]]):
        self.table = table

    def encode_word(self, word: str) -> list[int]:
        return list(self.table[word.strip()])

    def decode(self, ids):
        return " ".join(map(str, ids))


M, OTH = "SPEAKER_MAIN", "SPEAKER_OTHER"

WORKED = [
    AlignedWord("so", 9.95, 10.20, M),
    AlignedWord("Hello", 10.30, 10.70, M),
    AlignedWord("hi", 10.35, 10.50, OTH),
    AlignedWord("world.", 10.75, 11.10, M),
    AlignedWord("extraordinarily", 11.20, 11.30, M),
    AlignedWord("ok", 11.35, 11.50, M),
    AlignedWord("um", 11.60, 11.60, M),
    AlignedWord("bye", 12.00, 12.30, M),
]
TABLE = {"so": [10], "Hello": [100, 101], "hi": [150], "world.": [200], "extraordinarily": [400, 401, 402, 403, 404],
         "ok": [500], "um": [600], "bye": [700]}


def build(words, offset, duration, real=None, stats=None, table=TABLE):
    inter = Interleaver(FakeTokenizer(table))
    return inter.build(sorted(words, key=lambda w: w.start), offset, duration, num_frames(duration), real,
                       stats=stats)


def test_worked_example_frame_by_frame():
    stats = InterleaverStats()
    text = build(WORKED, 10.0, 2.0, stats=stats)
    expected = [3, 3, 0, 100, 101, 3, 3, 3, 0, 200, 3, 3, 3, 0, 400, 401, 500] + [3] * 8
    assert text.tolist() == expected
    assert stats.dropped_tokens[COLLISION] == 3  # 402-404 replaced by "ok"
    assert stats.dropped_words[STARTED_BEFORE] == 1 and stats.dropped_tokens[STARTED_BEFORE] == 1  # "so"
    assert stats.dropped_words[ZERO_DURATION] == 1  # "um"
    assert stats.dropped_words[OTHER_SPEAKER] == 1  # "hi"
    assert stats.words == 4 and stats.tokens == 9 and stats.tokens_written == 6


def test_worked_example_last_partial_chunk_is_zero_after_real_audio():
    # 1.3 s of real audio: 31200 samples -> 17 frames; frames 17..24 are -1 in the text row too
    text = build(WORKED, 10.0, 2.0, real=17)
    assert text[:17].tolist() == [3, 3, 0, 100, 101, 3, 3, 3, 0, 200, 3, 3, 3, 0, 400, 401, 500]
    assert (text[17:] == -1).all()


def test_start_on_frame_boundary_uses_float64_subtract_then_multiply():
    # 11.20 - 10.0 = 1.1999999999999993 -> frame 14, not 15
    text = build([AlignedWord("ok", 11.20, 11.3)], 10.0, 2.0)
    assert int(np.flatnonzero(text == 500)[0]) == 14


def test_word_crossing_chunk_end_is_cut_and_counted():
    stats = InterleaverStats()
    text = build([AlignedWord("extraordinarily", 1.85, 1.99)], 0.0, 2.0, stats=stats)  # frame 23 of 25
    assert text[22:].tolist() == [EPAD, 400, 401]
    assert stats.dropped_tokens[CHUNK_END] == 3 and stats.dropped_words[CHUNK_END] == 0


def test_tokens_beyond_real_audio_are_counted_as_cut():
    stats = InterleaverStats()
    text = build([AlignedWord("extraordinarily", 0.0, 0.5)], 0.0, 2.0, real=2, stats=stats)
    assert text[:2].tolist() == [400, 401] and (text[2:] == -1).all()
    assert stats.dropped_tokens[CHUNK_END] == 3 and stats.tokens_written == 2


def test_no_epad_at_frame_zero_and_epad_before_word():
    text = build([AlignedWord("Hello", 0.0, 0.2), AlignedWord("ok", 0.5, 0.6)], 0.0, 1.0)
    # frame 0: no EPAD before; "ok" at floor(6.25) = 6, EPAD at 5
    assert text.tolist() == [100, 101, 3, 3, 3, 0, 500, 3, 3, 3, 3, 3, 3]


def test_several_words_in_one_frame_last_wins():
    stats = InterleaverStats()
    words = [AlignedWord("Hello", 0.40, 0.5), AlignedWord("world.", 0.42, 0.5), AlignedWord("ok", 0.45, 0.6)]
    text = build(words, 0.0, 1.0, stats=stats)
    assert text[4:6].tolist() == [EPAD, 500] and text.tolist().count(100) == 0 and 200 not in text.tolist()
    assert stats.dropped_words[COLLISION] == 2 and stats.dropped_tokens[COLLISION] == 3


def test_colliding_word_truncates_previous_without_epad():
    words = [AlignedWord("extraordinarily", 0.0, 0.3), AlignedWord("ok", 0.16, 0.3)]  # ok at frame 2
    text = build(words, 0.0, 1.0)
    assert text[:4].tolist() == [400, 401, 500, 3]


def test_other_speaker_and_zero_duration_never_written():
    words = [AlignedWord("hi", 0.1, 0.3, OTH), AlignedWord("um", 0.5, 0.5, M)]
    text = build(words, 0.0, 1.0)
    assert (text == PAD).all()


def test_word_started_before_chunk_excluded_but_counted():
    stats = InterleaverStats()
    text = build([AlignedWord("Hello", 1.9, 2.3)], 2.0, 2.0, stats=stats)
    assert (text == PAD).all()
    assert stats.dropped_words[STARTED_BEFORE] == 1 and stats.dropped_tokens[STARTED_BEFORE] == 2


def test_word_at_chunk_end_belongs_to_next_chunk():
    words = [AlignedWord("ok", 2.0, 2.2)]
    assert (build(words, 0.0, 2.0) == PAD).all()
    assert build(words, 2.0, 2.0)[0] == 500


def test_stats_add_and_flat_dict():
    a, b = InterleaverStats(), InterleaverStats()
    build(WORKED, 10.0, 2.0, stats=a)
    build(WORKED, 10.0, 2.0, stats=b)
    a.add(b)
    d = a.as_dict()
    assert d["chunks"] == 2 and d["dropped_tokens/collision"] == 6 and d["tokens_written"] == 12


def test_chunk_plan_matches_reference():
    assert chunk_offsets(11.3, 2.0) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert chunk_offsets(2.0, 2.0) == [0.0]
    assert chunk_offsets(1.5, 2.0) == [0.0]
    assert chunk_offsets(4.0, 2.0) == [0.0, 2.0]
    assert num_frames(100) == 1250 and num_frames(10) == 125 and num_frames(2.1) == 27
    assert start_frame(10.0) == 125 and start_frame(2.1) == 26


@pytest.mark.parametrize("word", ["hello", " world ", "today"])
def test_spm_tokenizer_encodes_each_word_alone_without_bos(spm_model, word):
    tok = SentencePieceTextTokenizer(spm_model)
    ids = tok.encode_word(word)
    assert ids == tok.sp.encode(word.strip()) and tok.sp.bos_id() not in ids
    assert tok.decode(ids) == word.strip()
    assert (tok.pad_id, tok.epad_id, tok.initial_id) == (3, 0, tok.vocab_size)
