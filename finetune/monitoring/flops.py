"""Model FLOPs per frame from an LM config, and the peak FLOP/s of the device, for the logged MFU.

Counted: every matmul of the temporal transformer (attention projections, attention scores and values over
the attended frames, FFN), the text head, and the depformer (input projection, layers with attention over the
codebooks of one frame, audio heads), at 2 FLOPs per multiply-add; embeddings and norms are left out.
Training costs 3x the forward (backward: gradients of inputs and of weights), the usual MFU convention, also
for LoRA runs whose frozen weights get no gradient.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from typing import Any

import torch

from moshi.modules.gating import gating_hidden_size

# Dense bf16 tensor-core peak FLOP/s by device name (first match wins; longer names first).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H20", 148e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("4090", 165e12), ("3090", 71e12), ("V100", 125e12),
)


def _layer_flops(dim: int, ff: int, gating: str, attended: int) -> int:
    """Forward FLOPs of one transformer layer for one position attending to ``attended`` positions."""
    attn = 2 * dim * 3 * dim + 2 * dim * dim + 2 * 2 * dim * attended
    if gating == "none":
        ffn = 2 * 2 * dim * ff
    else:
        ffn = 3 * 2 * dim * gating_hidden_size(dim, ff)
    return attn + ffn


def flops_per_frame(lm_config: Mapping[str, Any], frames: int) -> int:
    """Training FLOPs (forward + backward) of one frame of a ``frames``-long sequence.

    Args:
        lm_config (Mapping): ``LMModel`` keyword arguments (a checkpoint's ``config.json``); absent
            ``depformer_*`` keys take the temporal transformer's values.
        frames (int): sequence length ``T``; a frame attends to ``min(T, context)`` frames.
    """
    c = lm_config
    dim, layers = int(c["dim"]), int(c["num_layers"])
    gating = str(c.get("gating", "none"))
    context = c.get("context")
    attended = frames if context is None else min(frames, int(context))
    temporal = layers * _layer_flops(dim, int(c.get("hidden_scale", 4) * dim), gating, attended)
    text_head = 2 * dim * int(c.get("text_card_out") or c["text_card"])
    depformer = 0
    dep_q = int(c.get("dep_q", 0))
    if dep_q:
        dd = int(c.get("depformer_dim", dim))
        ffs = c.get("depformer_dim_feedforward") or int(c.get("hidden_scale", 4) * dd)
        ffs = list(ffs) if isinstance(ffs, (list, tuple)) else [ffs] * dep_q
        dep_layers = int(c.get("depformer_num_layers", layers))
        dep_gating = str(c.get("depformer_gating", gating))
        for step in range(dep_q):
            ff = int(ffs[step] if len(ffs) == dep_q else ffs[0])
            depformer += 2 * dim * dd + dep_layers * _layer_flops(dd, ff, dep_gating, dep_q) + 2 * dd * int(c["card"])
    return 3 * (temporal + text_head + depformer)


def llm_flops_per_token(hf_config: Mapping[str, Any], frames: int) -> int:
    """Training FLOPs per token of a Hugging Face decoder LLM (grouped-query attention, gated FFN, LM head)."""
    c = hf_config
    h, layers, inter = int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["intermediate_size"])
    heads = int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or h // heads)
    qkv_out = heads * head_dim + 2 * kv * head_dim
    layer = 2 * h * qkv_out + 2 * heads * head_dim * h + 2 * 2 * heads * head_dim * frames + 3 * 2 * h * inter
    return 3 * (layers * layer + 2 * h * int(c["vocab_size"]))


@functools.cache
def measured_cpu_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """The best float32 matmul FLOP/s of this process's CPU threads (measured once per process)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / max(best, 1e-9)


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of ``device``: the bf16 table entry of a CUDA GPU (None if unknown), measured on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)
    if device.type == "cpu":
        return measured_cpu_peak_flops()
    return None
