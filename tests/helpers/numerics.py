"""Portable comparisons between float32 computations that sum in different orders.

Two float32 computations of the same math (different shapes, batch sizes, time blocks, streaming against
one-shot, chunked against whole) may run different kernels, which add the same products in different orders
and round differently. Which kernel runs depends on the CPU, the library build and size thresholds (a batch-1
convolution goes to oneDNN only above a certain size), so a bit-exact comparison that passes on one machine
fails on another. These helpers give the tolerance that rounding explains and nothing more, so a real bug (a
wrong weight, a frame off by one) still fails by orders of magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

EPS_F32 = torch.finfo(torch.float32).eps  # 2**-23: spacing of float32 numbers in [1, 2).


def f32_tolerance(depth: int, scale: float) -> tuple[float, float]:
    """The ``(rtol, atol)`` that covers two float32 evaluations of the same sums in different orders.

    Why this bound: a float32 sum of ``n`` terms computed in any order is within ``n * u * sum|terms|`` of the
    exact sum (``u = eps / 2``), so two orders differ by at most ``n * eps * sum|terms|``. That worst case
    needs every rounding to err the same way; rounding errors of long sums behave like independent random
    variables, and then the error stays below ``lam * sqrt(n) * u * sum|terms|`` except with probability
    ``2 * exp(-lam**2 / 2)`` (a concentration bound on a sum of independent bounded errors). With ``lam = 8`` that probability is
    about 3e-14 per element, so the tolerance is ``min(n, 8 * sqrt(n)) * eps`` relative to ``scale``.

    Through a chain of layers the first-order rounding errors add, so ``depth`` is the total number of terms
    accumulated along the path to one output (the sum of the fan-ins: ``in_channels * kernel_size`` per
    convolution, ``in_features`` per linear layer, the length of a normalisation or attention sum).
    ``scale`` stands for the size of the terms, taken as the size of the values compared. Measured kernels
    differences (oneDNN against native convolutions, AVX-512 against AVX2 against scalar kernels, one thread
    against two) stay at least 70 times below this bound on Mimi, while a real bug (a wrong weight, a lost left
    context, a frame off by one) moves outputs by their own size, far above it.
    """
    if depth < 1:
        raise ValueError(f"depth must be a positive number of accumulated terms, got {depth}")
    rtol = min(depth, 8.0 * math.sqrt(depth)) * EPS_F32
    return rtol, rtol * max(float(scale), torch.finfo(torch.float32).tiny)


def summed_fan_in(*modules: torch.nn.Module) -> int:
    """The accumulation depth of a path through ``modules``: the sum of the fan-ins of their linear maps.

    Counts ``in_features`` per ``nn.Linear``, ``in_channels / groups * kernel_size`` per ``nn.Conv1d`` and
    ``in_channels / groups * ceil(kernel_size / stride)`` per ``nn.ConvTranspose1d`` (the input frames that
    reach one output sample). Normalisations and attention add sums of their own; callers add those.
    """
    depth = 0
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear):
                depth += layer.in_features
            elif isinstance(layer, torch.nn.Conv1d):
                depth += layer.in_channels // layer.groups * layer.kernel_size[0]
            elif isinstance(layer, torch.nn.ConvTranspose1d):
                depth += layer.in_channels // layer.groups * -(-layer.kernel_size[0] // layer.stride[0])
    return depth


def assert_close_f32(actual: torch.Tensor, expected: torch.Tensor, *, depth: int, scale: float | None = None) -> None:
    """Asserts ``actual`` equals ``expected`` up to float32 rounding over ``depth`` accumulated terms.

    Shapes and dtypes must match exactly. ``scale`` defaults to the largest magnitude in ``expected``; see
    :func:`f32_tolerance` for the argument behind the tolerance.
    """
    if scale is None:
        scale = expected.detach().abs().max().item() if expected.numel() else 1.0
    rtol, atol = f32_tolerance(depth, scale)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def near_tie_tolerance(latents_a: torch.Tensor, latents_b: torch.Tensor, dim: int = 1) -> float:
    """The distance margin within which two runs whose latents differ by rounding may pick different codes.

    Why: if a vector moves by ``d`` (L2), its distance to every codeword moves by at most ``d``, so the code
    can flip from ``c1`` to ``c2`` only if ``|x - c2| - |x - c1| <= 2 d``. ``d`` is the largest L2 difference
    between corresponding latent vectors (vectors along ``dim``); the relative float32 slack covers the
    rounding of the distances themselves.
    """
    gap = (latents_a.float() - latents_b.float()).norm(dim=dim).max().item()
    size = latents_a.float().norm(dim=dim).max().item()
    return 2.0 * gap + 64 * EPS_F32 * size


def f32_latent_gap(latent: torch.Tensor, depth: int, dim: int = 1) -> float:
    """Bound on the L2 distance between a latent vector and its recomputation in another summation order.

    Each element may move by ``atol + rtol * |value|`` of :func:`f32_tolerance` (at most ``2 * atol``, the
    scale being the largest magnitude), so a vector of ``n`` elements along ``dim`` moves by at most
    ``sqrt(n)`` times that. Use it as ``latent_gap`` when run b's latent is not at hand.
    """
    _, atol = f32_tolerance(depth, latent.detach().abs().max().item())
    return 2.0 * atol * math.sqrt(latent.shape[dim])


def assert_codes_match(
    codes_a: torch.Tensor,
    codes_b: torch.Tensor,
    latents: torch.Tensor,
    codebooks: Sequence[torch.Tensor],
    tol: float,
    *,
    max_flip_fraction: float = 0.1,
) -> None:
    """Asserts two residual quantisations of nearly equal latents agree except at explained near ties.

    Args:
        codes_a (torch.Tensor): codes ``[B, K, T]`` of run a, computed from ``latents``.
        codes_b (torch.Tensor): codes ``[B, K, T]`` of run b, from latents that differ by rounding.
        latents (torch.Tensor): the vectors run a quantised, ``[B, D, T]`` (after any input projection).
        codebooks (Sequence[torch.Tensor]): the ``K`` centroid tables ``[bins, D]`` of the residual levels.
        tol (float): distance margin that rounding explains (see :func:`near_tie_tolerance`).
        max_flip_fraction (float): largest share of frames allowed to differ (at least one frame).

    Why: rounding may push a latent across the boundary between two codewords that are nearly equally close;
    that flip is legitimate only if run b's codeword is within ``tol`` of being as close as run a's. Once a
    level flips, the residuals the later levels see differ by a whole codeword, so the later levels of that
    frame may differ freely. Any flip that is not a near tie fails, and so do too many flips: rounding flips
    few frames, while a systematic change (a biased distance, a shifted latent) flips many.
    """
    if codes_a.shape != codes_b.shape:
        raise AssertionError(f"code shapes differ: {tuple(codes_a.shape)} vs {tuple(codes_b.shape)}")
    if codes_a.shape[1] != len(codebooks):
        raise AssertionError(f"{codes_a.shape[1]} code levels but {len(codebooks)} codebooks")
    codes_a, codes_b = codes_a.long(), codes_b.long()
    batch, _, steps = codes_a.shape
    residual = latents.float().transpose(1, 2)  # [B, T, D]
    settled = torch.ones(batch, steps, dtype=torch.bool, device=codes_a.device)  # no flip yet in this frame
    flipped = torch.zeros_like(settled)
    for level, codebook in enumerate(codebooks):
        a, b = codes_a[:, level], codes_b[:, level]
        differs = (a != b) & settled
        if differs.any():
            distances = torch.cdist(residual, codebook.float()[None].expand(batch, -1, -1))  # [B, T, bins]
            margin = distances.gather(-1, b[..., None]) - distances.gather(-1, a[..., None])
            unexplained = differs & (margin[..., 0] > tol)
            if unexplained.any():
                where = unexplained.nonzero().tolist()
                raise AssertionError(
                    f"level {level}: {len(where)} code flips are not near ties (margin > {tol:.3g}); "
                    f"first at (batch, frame) {where[0]}, margin {margin[..., 0][unexplained].max().item():.3g}"
                )
        flipped |= differs
        settled &= ~differs
        residual = residual - codebook.float()[a]
    allowed = max(1, int(max_flip_fraction * batch * steps))
    if int(flipped.sum()) > allowed:
        raise AssertionError(
            f"{int(flipped.sum())} of {batch * steps} frames flipped at near ties, more than the {allowed} allowed"
        )


def assert_quantizer_codes_match(
    quantizer: torch.nn.Module,
    latent_a: torch.Tensor,
    codes_a: torch.Tensor,
    codes_b: torch.Tensor,
    *,
    latent_b: torch.Tensor | None = None,
    latent_gap: float | None = None,
    max_flip_fraction: float = 0.1,
) -> None:
    """:func:`assert_codes_match` for a ``ResidualVectorQuantizer`` or Mimi's split quantiser.

    ``latent_a`` ``[B, C, T]`` is the quantiser input of run a, ``codes_a``/``codes_b`` the codes of the two
    runs. The near-tie margin comes from run b's latent ``latent_b`` when given, else from ``latent_gap``, a
    bound on the L2 distance between corresponding latent vectors of the two runs (for codes computed
    elsewhere); each input projection stretches that gap by at most its spectral norm. Each residual chain
    (the semantic and the acoustic one of the split quantiser) is checked on its own projected latents.
    """
    if (latent_b is None) == (latent_gap is None):
        raise ValueError("give exactly one of latent_b and latent_gap")
    parts = [quantizer.rvq_first, quantizer.rvq_rest] if hasattr(quantizer, "rvq_first") else [quantizer]
    start = 0
    with torch.no_grad():
        for part in parts:
            levels = part.n_q
            projected_a = part.input_proj(latent_a).float()
            if latent_b is not None:
                tol = near_tie_tolerance(projected_a, part.input_proj(latent_b).float())
            else:
                weight = getattr(part.input_proj, "weight", None)
                stretch = 1.0 if weight is None else torch.linalg.matrix_norm(weight[..., 0].float(), ord=2).item()
                tol = 2.0 * stretch * latent_gap + 64 * EPS_F32 * projected_a.norm(dim=1).max().item()
            codebooks = [layer._codebook.embedding for layer in part.vq.layers[:levels]]
            assert_codes_match(
                codes_a[:, start : start + levels],
                codes_b[:, start : start + levels],
                projected_a,
                codebooks,
                tol,
                max_flip_fraction=max_flip_fraction,
            )
            start += levels
    if start != codes_a.shape[1]:
        raise AssertionError(f"codes have {codes_a.shape[1]} levels, the quantizer encodes {start}")


def mimi_depth(mimi: torch.nn.Module, side: str) -> int:
    """Accumulation depth of Mimi's ``"encoder"`` (audio to latent) or ``"decoder"`` (latent to audio) path.

    The fan-ins of every linear map on the path (:func:`summed_fan_in`), plus per transformer layer two
    normalisations over the width and one attention sum over at most the context.
    """
    if side == "encoder":
        modules = [mimi.encoder, mimi.encoder_transformer, mimi.downsample]
    elif side == "decoder":
        modules = [mimi.upsample, mimi.decoder_transformer, mimi.decoder]
    else:
        raise ValueError(f"side must be 'encoder' or 'decoder', got {side!r}")
    depth = summed_fan_in(*[m for m in modules if m is not None])
    transformer = modules[1]
    if transformer is not None:
        for layer in transformer.transformer.layers:
            attention = layer.self_attn
            if attention.context is None:
                raise ValueError("unbounded attention: its sums are as long as the input, pass a depth by hand")
            depth += 2 * attention.embed_dim + attention.context
    return depth


def assert_mimi_codes(mimi: torch.nn.Module, audio: torch.Tensor, codes: torch.Tensor) -> None:
    """``codes [B, K, T]`` are Mimi's codes of ``audio [B, 1, L]`` up to near ties.

    For codes that came out of other Mimi calls (files batched together, streaming segments, a chunk
    encoded alone): their latents differ from this call's by float32 rounding over the encoder's depth
    (:func:`f32_latent_gap`), so a code may flip only where its two nearest codewords are within that rounding.
    """
    with torch.no_grad():
        latent = mimi.encode_to_latent(audio, quantize=False)
        reference = mimi.quantizer.encode(latent)
    gap = f32_latent_gap(latent, mimi_depth(mimi, "encoder"))
    assert_quantizer_codes_match(mimi.quantizer, latent, reference, codes, latent_gap=gap)
