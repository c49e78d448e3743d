"""Generates everything the CPU demo and the trainer tests need, offline and deterministic from a seed.

    python scripts/make_tiny_assets.py --out demo_run/assets [--seed 0] [--files 10]

Writes into `--out`:
  data/train.jsonl, data/eval.jsonl   manifests (paths relative to data/)
  data/audio/NNN.wav + NNN.json       24 kHz stereo; left = the model's voice: a sequence of tone
                                      "words" (one pitch pair per word) with their word alignments;
                                      right = the user: other tones, no alignments needed
  model.safetensors                   a tiny random Moshi LM (Kyutai tensor names)
  config.json                         its config in Kyutai's format (LM kwargs + moshi_name, mimi_name,
                                      tokenizer_name, mimi_config_name)
  mimi.safetensors, mimi_config.json  a tiny random Mimi (`TINY_MIMI_CONFIG`)
  tokenizer.model                     a tiny SentencePiece model trained on the transcripts

The data are learnable on purpose: words follow a fixed cyclic order with fixed lengths, so the text
stream (and the steady tones' Mimi codes) become predictable and the demo's loss visibly drops.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from finetune.data.alignments import AlignedWord, write_alignments
from finetune.data.audio import write_wav
from finetune.data.manifest import write_manifest
from moshi.utils.atomic import atomic_save_safetensors, atomic_write_json

logger = logging.getLogger("make_tiny_assets")

SAMPLE_RATE = 24000
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
         "kilo", "lima"]
MIMI_CODEBOOKS = 4  # per channel; the LM has n_q = 8 streams of audio (4 model + 4 user)

# The tiny LM: the structure of moshiko-7B (rope, rms_norm_f32, silu gating, per-step depformer weights).
def tiny_lm_config(text_card: int, card: int) -> dict:
    return {
        "dim": 64, "text_card": text_card, "existing_text_padding_id": 3, "n_q": 2 * MIMI_CODEBOOKS,
        "dep_q": MIMI_CODEBOOKS, "card": card, "num_heads": 4, "num_layers": 2, "hidden_scale": 4.125,
        "causal": True, "layer_scale": None, "context": 100, "max_period": 10000, "gating": "silu",
        "norm": "rms_norm_f32", "positional_embedding": "rope", "depformer_dim": 32,
        "depformer_dim_feedforward": 132, "depformer_num_heads": 2, "depformer_num_layers": 2,
        "depformer_layer_scale": None, "depformer_multi_linear": True, "depformer_context": MIMI_CODEBOOKS,
        "depformer_max_period": 10000, "depformer_gating": "silu", "depformer_pos_emb": "none",
        "depformer_weights_per_step": True,
        "delays": [0] + [0] + [1] * (MIMI_CODEBOOKS - 1) + [0] + [1] * (MIMI_CODEBOOKS - 1),
    }


def _tone(freqs: tuple[float, ...], n: int, amp: float) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    x = sum(np.sin(2 * np.pi * f * t) for f in freqs) / len(freqs)
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.01 * SAMPLE_RATE))
    return (amp * x * fade).astype(np.float32)


def make_file(rng: np.random.Generator, duration: float) -> tuple[np.ndarray, list[AlignedWord]]:
    """One stereo file: left = cyclic tone words with alignments, right = user tones in the gaps."""
    n = int(duration * SAMPLE_RATE)
    wav = np.zeros((2, n), dtype=np.float32)
    words: list[AlignedWord] = []
    k = int(rng.integers(len(WORDS)))
    t = 0.3
    while True:
        word = WORDS[k % len(WORDS)]
        length = 0.24 + 0.04 * len(word)  # fixed per word: its duration is predictable
        if t + length + 0.32 > duration - 0.1:
            break
        i = k % len(WORDS)
        a, b = int(t * SAMPLE_RATE), int((t + length) * SAMPLE_RATE)
        # multiples of 12.5 Hz: every 80 ms frame holds whole periods, so a steady tone gives steady codes
        wav[0, a:b] += _tone((200.0 + 25.0 * i, 300.0 + 37.5 * i), b - a, 0.5)
        words.append(AlignedWord(word, round(t, 3), round(t + length, 3)))
        gap = 0.32
        # the user answers in the gap, on the other channel
        ua, ub = b + int(0.04 * SAMPLE_RATE), b + int((gap - 0.04) * SAMPLE_RATE)
        wav[1, ua:ub] += _tone((600.0 + 50.0 * (i % 5),), ub - ua, 0.3)
        t += length + gap
        k += 1
    return wav, words


def _kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Plain Lloyd k-means on rows of `x` [M, D] → centroids [k, D] (empty clusters keep their seed)."""
    centroids = x[torch.randperm(x.shape[0], generator=gen)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                centroids[j] = members.mean(0)
    return centroids


@torch.no_grad()
def fit_mimi_codebooks(mimi: torch.nn.Module, waves: list[np.ndarray], seed: int, iters: int = 6) -> None:
    """Sets each random codebook to k-means centroids of the synthetic audio's latents.

    A randomly initialised Mimi maps every frame to one codeword (its random codebooks are far from the
    latents), so its codes carry nothing; fitted codebooks make the codes follow the tones.
    """
    gen = torch.Generator().manual_seed(seed)
    latents = [mimi.encode_to_latent(torch.from_numpy(w)[:, None], quantize=False) for w in waves]  # [2, D, T]
    frames = torch.cat([lat.permute(0, 2, 1).reshape(-1, lat.shape[1]) for lat in latents])  # [M, D]
    q = mimi.quantizer
    for rvq in (q.rvq_first, q.rvq_rest):
        residual = rvq.input_proj(frames.T[None])[0].T.float()
        for layer in rvq.vq.layers:
            cb = layer._codebook
            centroids = _kmeans(residual, cb.embedding_sum.shape[0], iters, gen)
            cb.embedding_sum.copy_(centroids)
            cb.cluster_usage.fill_(1.0)
            residual = residual - centroids[torch.cdist(residual, centroids).argmin(1)]


def train_tokenizer(sentences: list[str], out: Path, vocab_size: int) -> None:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,  # Moshi's layout: PAD = 3; EPAD = 0 (the unk id)
        num_threads=1, minloglevel=2,
    )
    from moshi.utils.atomic import atomic_write_bytes

    atomic_write_bytes(out, model.getvalue())


def make_assets(out: str | Path, seed: int = 0, files: int = 10, eval_files: int = 2,
                min_sec: float = 10.0, max_sec: float = 16.0) -> Path:
    """Writes the assets into `out` (created); returns its path. Same seed → same files."""
    from moshi.models.compression import TINY_MIMI_CONFIG, build_mimi
    from moshi.models.lm import LMModel

    out = Path(out)
    audio_dir = out / "data" / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries: list[tuple[Path, float]] = []
    sentences: list[str] = []
    waves: list[np.ndarray] = []
    for i in range(files + eval_files):
        duration = float(np.round(rng.uniform(min_sec, max_sec), 2))
        wav, words = make_file(rng, duration)
        path = audio_dir / f"{i:03d}.wav"
        write_wav(path, wav, SAMPLE_RATE)
        waves.append(wav)
        write_alignments(path.with_suffix(".json"), words)
        entries.append((path, duration))
        sentences.append(" ".join(w.text for w in words))
    write_manifest(out / "data" / "train.jsonl", entries[:files])
    write_manifest(out / "data" / "eval.jsonl", entries[files:])

    train_tokenizer(sentences * 4, out / "tokenizer.model", vocab_size=48)
    import sentencepiece as spm

    text_card = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).get_piece_size()

    torch.manual_seed(seed)
    mimi_config = json.loads(json.dumps(TINY_MIMI_CONFIG))
    mimi = build_mimi(mimi_config)
    fit_mimi_codebooks(mimi, waves[:files], seed)
    atomic_save_safetensors(out / "mimi.safetensors", mimi.state_dict())
    atomic_write_json(out / "mimi_config.json", mimi_config, indent=2)

    card = int(mimi_config["quantizer"]["bins"])
    lm_config = tiny_lm_config(text_card, card)
    torch.manual_seed(seed + 1)
    lm = LMModel(**lm_config)
    atomic_save_safetensors(out / "model.safetensors", lm.state_dict())
    config = dict(lm_config, moshi_name="model.safetensors", mimi_name="mimi.safetensors",
                  tokenizer_name="tokenizer.model", mimi_config_name="mimi_config.json")
    atomic_write_json(out / "config.json", config, indent=2)
    logger.info("assets in %s: %d train + %d eval files, text vocab %d, audio card %d, LM %d params",
                out, files, eval_files, text_card, card, sum(p.numel() for p in lm.parameters()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_run/assets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--files", type=int, default=10, help="training files (2 more are written for eval)")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_assets(a.out, seed=a.seed, files=a.files)


if __name__ == "__main__":
    main()
