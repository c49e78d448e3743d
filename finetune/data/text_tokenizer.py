"""Text tokenizers for the text stream: Kyutai's SentencePiece model or a Hugging Face one (DSAA).

The interleaver needs only: the ids of one aligned word (encoded alone, no BOS), the
PAD and EPAD ids that fill the frames between words, and the initial text token the LM
puts in front of the stream. Both implementations expose exactly that.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from finetune.args import TrainArgs

# Kyutai's text-stream ids (LM config `existing_text_padding_id`, `end_of_text_padding_id`).
SPM_PAD_ID = 3
SPM_EPAD_ID = 0


@runtime_checkable
class TextTokenizer(Protocol):
    pad_id: int
    epad_id: int
    initial_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode_word(self, word: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class SentencePieceTextTokenizer:
    """Kyutai's SentencePiece tokenizer (`tokenizer_spm_32k_3.model`).

    Each word is encoded on its own, without BOS, after stripping spaces; the SPM dummy
    prefix gives its first piece the word-boundary marker. A newline inside a word
    splits it, the parts joined with the model's newline piece (dropped when the model
    has none). PAD = 3, EPAD = 0; the initial token is the vocabulary size (Moshi's
    `text_card`).
    """

    def __init__(self, model_path: str | os.PathLike, pad_id: int = SPM_PAD_ID, epad_id: int = SPM_EPAD_ID,
                 initial_id: int | None = None):
        import sentencepiece

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        n = self.sp.get_piece_size()
        for name, v in (("pad_id", pad_id), ("epad_id", epad_id)):
            if not 0 <= v < n:
                raise ValueError(f"{name}={v} is outside the SentencePiece vocabulary of {n} pieces ({model_path})")
        self.pad_id = int(pad_id)
        self.epad_id = int(epad_id)
        self.initial_id = int(n if initial_id is None else initial_id)
        nl = self.sp.piece_to_id("\n")
        self._newline: list[int] = [] if nl == self.sp.unk_id() else [nl]

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.initial_id

    def encode_word(self, word: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(word.strip().split("\n")):
            if i:
                ids.extend(self._newline)
            ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


class HFTextTokenizer:
    """A `transformers` tokenizer in the DSAA text stream (see `docs/dsaa.md`, "Special tokens").

    Words are stripped and encoded without special tokens. PAD/EPAD/initial ids come from
    `moshi.models.dsaa_tokens.resolve_special_tokens` (the one place those rules live).
    """

    def __init__(self, tokenizer: Any, pad_token: str | None = None, epad_token: str | None = None,
                 bos_token: str | None = None):
        from moshi.models.dsaa_tokens import resolve_special_tokens

        self.tokenizer = tokenizer
        self.special = resolve_special_tokens(tokenizer, pad_token=pad_token, epad_token=epad_token,
                                              bos_token=bos_token)
        self.pad_id = self.special.pad_id
        self.epad_id = self.special.epad_id
        self.initial_id = self.special.bos_id

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
                        pad_token: str | None = None, epad_token: str | None = None,
                        bos_token: str | None = None) -> HFTextTokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        return cls(tok, pad_token=pad_token, epad_token=epad_token, bos_token=bos_token)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def bos_id(self) -> int:
        return self.initial_id

    def encode_word(self, word: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(word.strip(), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


def load_text_tokenizer(args: TrainArgs, spm_path: str | os.PathLike | None = None,
                        hf_path: str | None = None) -> TextTokenizer:
    """The tokenizer a run uses: HF (from `text_llm`, or `hf_path`, e.g. a checkpoint's
    `tokenizer/` folder) when `text_llm.enable`, else the SentencePiece model at `spm_path`."""
    t = args.text_llm
    if t.enable:
        return HFTextTokenizer.from_pretrained(
            hf_path or t.hf_repo_id, revision=None if hf_path else t.revision,
            trust_remote_code=t.trust_remote_code,
            pad_token=t.pad_token, epad_token=t.epad_token, bos_token=t.bos_token,
        )
    if spm_path is None:
        raise ValueError("a SentencePiece model path is needed (moshi_paths.tokenizer_path or the repo's file)")
    return SentencePieceTextTokenizer(spm_path)
