"""The text row of a chunk: aligned words placed on the 12.5 Hz frame grid.

Placement is the one moshi-finetune uses, so existing datasets give the same text stream:

* the chunk at offset o of length d takes the `SPEAKER_MAIN` words with o <= start < o+d;
* a word starts at frame f = floor(12.5 * (start - o)) (subtract first, then multiply, in
  float64) and writes one token per frame from there;
* before each token, if the previous frame holds PAD (and t > 0), it becomes EPAD;
* a word that starts while the previous one still has tokens to write replaces them
  (the rest are dropped); several words starting in one frame: the last one wins;
* tokens past the chunk end are cut; zero-duration words are dropped.

Frames after the real audio of a file's last, partial chunk are the zero token (-1: no
input, no loss) in the text row as in the audio rows, so the model is not trained to
predict PAD where there is no audio.

Every lost word or token is counted by reason in `InterleaverStats`.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from finetune.data.alignments import MAIN_SPEAKER, AlignedWord
from finetune.data.text_tokenizer import TextTokenizer

ZERO_TOKEN = -1

# reasons a word or token does not reach the text stream
COLLISION = "collision"  # the next word started before all its tokens were written
CHUNK_END = "chunk_end"  # tokens past the chunk end (or past the real audio of the last chunk)
STARTED_BEFORE = "started_before_chunk"  # main-speaker word crossing the chunk start
ZERO_DURATION = "zero_duration"
OTHER_SPEAKER = "other_speaker"  # not a loss (that speaker's audio is the user channel); counted for reference
REASONS = (COLLISION, CHUNK_END, STARTED_BEFORE, ZERO_DURATION, OTHER_SPEAKER)


@dataclass
class InterleaverStats:
    """Counts of placed and lost text; add them up across chunks, batches, ranks."""

    chunks: int = 0
    words: int = 0  # main-speaker words starting in their chunk with a positive duration
    tokens: int = 0  # their tokens
    tokens_written: int = 0
    dropped_words: Counter = field(default_factory=Counter)  # words with no token written, by reason
    dropped_tokens: Counter = field(default_factory=Counter)  # tokens not written, by reason

    def add(self, other: InterleaverStats) -> InterleaverStats:
        self.chunks += other.chunks
        self.words += other.words
        self.tokens += other.tokens
        self.tokens_written += other.tokens_written
        self.dropped_words.update(other.dropped_words)
        self.dropped_tokens.update(other.dropped_tokens)
        return self

    def as_dict(self) -> dict[str, int]:
        """Flat counters (e.g. `dropped_tokens/collision`) for metrics logging."""
        d = {"chunks": self.chunks, "words": self.words, "tokens": self.tokens,
             "tokens_written": self.tokens_written}
        for r in REASONS:
            d[f"dropped_words/{r}"] = int(self.dropped_words.get(r, 0))
            d[f"dropped_tokens/{r}"] = int(self.dropped_tokens.get(r, 0))
        return d

    def summary(self) -> str:
        lost = sum(self.dropped_tokens[r] for r in (COLLISION, CHUNK_END, STARTED_BEFORE))
        parts = ", ".join(f"{r} {self.dropped_tokens[r]}" for r in REASONS if self.dropped_tokens[r])
        pct = 100.0 * lost / max(1, self.tokens + self.dropped_tokens[STARTED_BEFORE])
        return (f"text: {self.chunks} chunks, {self.tokens_written}/{self.tokens} tokens written, "
                f"{lost} lost ({pct:.1f}%){': ' + parts if parts else ''}")


class Interleaver:
    """Builds text rows from word alignments; word tokenizations are memoised."""

    def __init__(self, tokenizer: TextTokenizer, frame_rate: float = 12.5, main_speaker: str = MAIN_SPEAKER,
                 memo_size: int = 200_000):
        self.tokenizer = tokenizer
        self.frame_rate = float(frame_rate)
        self.main_speaker = main_speaker
        self.pad_id = tokenizer.pad_id
        self.epad_id = tokenizer.epad_id
        self._memo: dict[str, list[int]] = {}
        self._memo_size = memo_size

    def tokens(self, word: str) -> list[int]:
        ids = self._memo.get(word)
        if ids is None:
            ids = self.tokenizer.encode_word(word)
            if len(self._memo) < self._memo_size:
                self._memo[word] = ids
        return ids

    def build(
        self,
        words: Sequence[AlignedWord],
        offset_sec: float,
        duration_sec: float,
        num_frames: int,
        real_frames: int | None = None,
        starts: Sequence[float] | None = None,
        stats: InterleaverStats | None = None,
    ) -> np.ndarray:
        """Text row `[num_frames]` int64 for the chunk `[offset_sec, offset_sec + duration_sec)`.

        Args:
            words: the file's words, sorted by start (as `load_alignments` returns them).
            offset_sec: chunk start in the file (seconds).
            duration_sec: chunk length (seconds); words starting at or after the end are not in it.
            num_frames: frames of the row, `ceil(duration_sec * frame_rate)`.
            real_frames: frames backed by real audio; later frames are -1 (default: all).
            starts: `[w.start for w in words]`, to skip recomputing it per chunk.
            stats: counters to update.
        """
        st = stats if stats is not None else InterleaverStats()
        st.chunks += 1
        fr = self.frame_rate
        o = float(offset_sec)
        if starts is None:
            starts = [w.start for w in words]
        lo = bisect.bisect_left(starts, o)
        hi = bisect.bisect_left(starts, o + duration_sec)
        # main-speaker words that began before the chunk but still run into it are lost here
        for w in words[:lo]:
            if w.speaker == self.main_speaker and w.end > o and w.end > w.start:
                st.dropped_words[STARTED_BEFORE] += 1
                st.dropped_tokens[STARTED_BEFORE] += len(self.tokens(w.text))
        # (start frame, tokens) of the kept words, in start order
        placed: list[tuple[int, list[int]]] = []
        for w in words[lo:hi]:
            if w.speaker != self.main_speaker:
                st.dropped_words[OTHER_SPEAKER] += 1
                continue
            s, e = w.start - o, w.end - o
            ids = self.tokens(w.text)
            if s >= e:
                st.dropped_words[ZERO_DURATION] += 1
                st.dropped_tokens[ZERO_DURATION] += len(ids)
                continue
            st.words += 1
            st.tokens += len(ids)
            placed.append((math.floor(fr * s), ids))

        text = np.full(num_frames, self.pad_id, dtype=np.int64)
        # Event-driven form of a frame-by-frame loop: a word is consumed at frame f
        # (the first t with 12.5*s < t+1); its tokens then go to f, f+1, ... until the
        # next word is consumed or the row ends.
        i, n = 0, len(placed)
        while i < n:
            f = placed[i][0]
            # several words in one frame: the last one wins
            j = i
            while j + 1 < n and placed[j + 1][0] <= f:
                _, skipped = placed[j]
                self._drop(st, COLLISION, skipped, 0)
                j += 1
            _, ids = placed[j]
            next_f = placed[j + 1][0] if j + 1 < n else None
            limit = num_frames if next_f is None else min(num_frames, next_f)
            written = max(0, min(len(ids), limit - f))
            for k in range(written):
                t = f + k
                if t > 0 and text[t - 1] == self.pad_id:
                    text[t - 1] = self.epad_id
                text[t] = ids[k]
            if written < len(ids):
                reason = COLLISION if next_f is not None and next_f < min(num_frames, f + len(ids)) else CHUNK_END
                self._drop(st, reason, ids, written)
            st.tokens_written += written
            i = j + 1

        if real_frames is not None and real_frames < num_frames:
            beyond = text[max(0, real_frames):]
            n_cut = int(np.count_nonzero((beyond != self.pad_id) & (beyond != self.epad_id)))
            st.tokens_written -= n_cut
            st.dropped_tokens[CHUNK_END] += n_cut
            text[max(0, real_frames):] = ZERO_TOKEN
        return text

    @staticmethod
    def _drop(st: InterleaverStats, reason: str, ids: list[int], written: int) -> None:
        st.dropped_tokens[reason] += len(ids) - written
        if written == 0:
            st.dropped_words[reason] += 1
