"""Linear centred kernel alignment (CKA) between two sets of per-frame vectors of the same frames.

For ``X [n, p]`` and ``Y [n, q]`` with centred columns, ``K = X Xᵀ`` and ``L = Y Yᵀ``:

- plug-in: ``HSIC(K, L) = tr(K L) / (n - 1)²`` and ``CKA = ‖Yᵀ X‖²_F / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F)``. It is biased
  upwards when the width is comparable to the number of frames: two independent Gaussian sets with
  ``p ≈ n`` give a CKA far from 0.
- debiased: the unbiased HSIC estimator (a U-statistic over distinct frames). With ``K̃``, ``L̃`` the Grams
  with a zero diagonal and ``d_i = ‖x_i‖²``, ``e_i = ‖y_i‖²`` on centred data,
  ``n (n - 3) HSIC_u = tr(K̃ L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n - 1)(n - 2)) - 2 (1ᵀK̃L̃1) / (n - 2)`` where
  ``tr(K̃ L̃) = ‖Yᵀ X‖²_F - Σ d_i e_i``, ``1ᵀK̃1 = -Σ d_i`` and ``1ᵀK̃L̃1 = Σ d_i e_i``. Its expectation is the
  population HSIC, 0 for independent sets whatever the width.

Both need only second-order sums over frames (``Xᵀ X``, ``Yᵀ Y``, ``Yᵀ X``, ``Σ d``, ``Σ d²``, ``Σ d e``), so
:class:`GroupCKA` accumulates them batch by batch (float64) and gives exactly the CKA of all frames together,
without holding the frames (two passes: the centred norms need the pooled mean). :class:`MinibatchCKA` instead
averages the HSIC terms of blocks of frames
(minibatch CKA), which needs only ``m x m`` Grams per stream and so scales to many wide streams.

CKA is invariant to orthogonal maps and isotropic scaling of either side and to translations, not to general
invertible maps. When one set is a block of the other (``Y = [X, A]``) and ``Aᵀ X = 0``,
``CKA(X, Y) = ‖XᵀX‖ / sqrt(‖XᵀX‖² + ‖AᵀA‖²)``: a ratio of block norms, not a similarity of representations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from finetune.analysis.pca import ACC_DTYPE, CovarianceAccumulator


def _as_acc(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"expected a [frames, features] matrix, got shape {tuple(x.shape)}")
    return x.detach().to(ACC_DTYPE)


class GroupCKA:
    """Exact pooled linear CKA between every pair of ``S`` streams of the same frames, batch by batch.

    Two passes over the data: :meth:`update_moments` accumulates the sum and the cross-products of the
    concatenated rows ``[x_1, ..., x_S]`` (float64, ``(Σ p_s)²`` memory); :meth:`update_norms` then adds the
    centred squared row norms ``d_s`` the debiased estimator needs (``Σ d_s`` and ``Σ d_s d_t``). Plug-in CKA
    needs only the first pass. The diagonal blocks are each stream's covariance (:meth:`pca`).
    """

    def __init__(self, dims: Sequence[int]) -> None:
        self.dims = [int(d) for d in dims]
        self.offsets = [0]
        for d in self.dims:
            self.offsets.append(self.offsets[-1] + d)
        self.moments = CovarianceAccumulator()
        self.norm_frames = 0
        self.sum_d = torch.zeros(len(self.dims), dtype=ACC_DTYPE)
        self.sum_dd = torch.zeros(len(self.dims), len(self.dims), dtype=ACC_DTYPE)
        self._centred: torch.Tensor | None = None

    def _cat(self, streams: Sequence[torch.Tensor]) -> torch.Tensor:
        if [s.shape[-1] for s in streams] != self.dims:
            raise ValueError(f"stream widths {[s.shape[-1] for s in streams]}, expected {self.dims}")
        n = {s.shape[0] for s in streams}
        if len(n) != 1:
            raise ValueError(f"streams have {sorted(n)} frames: CKA compares the same frames")
        return torch.cat([_as_acc(s) for s in streams], dim=1)

    def update_moments(self, streams: Sequence[torch.Tensor]) -> None:
        """First pass: one batch, the same frames in every stream."""
        if self._centred is not None:
            raise RuntimeError("update_moments after update_norms: the first pass is over")
        self.moments.update(self._cat(streams))

    def update_norms(self, streams: Sequence[torch.Tensor]) -> None:
        """Second pass (debiased CKA only): the same batches again."""
        if self._centred is None:
            self._centred = self.moments.outer - self.moments.n * torch.outer(self.moments.mean, self.moments.mean)
        x = self._cat(streams) - self.moments.mean
        d = torch.stack([x[:, a:b].pow(2).sum(dim=1) for a, b in zip(self.offsets, self.offsets[1:])], dim=1)
        self.sum_d += d.sum(dim=0).cpu()
        self.sum_dd += (d.T @ d).cpu()
        self.norm_frames += x.shape[0]

    def _block_fro2(self) -> torch.Tensor:
        s = self._centred
        if s is None:
            s = self.moments.outer - self.moments.n * torch.outer(self.moments.mean, self.moments.mean)
        k = len(self.dims)
        out = torch.zeros(k, k, dtype=ACC_DTYPE)
        for i in range(k):
            for j in range(i, k):
                block = s[self.offsets[i] : self.offsets[i + 1], self.offsets[j] : self.offsets[j + 1]]
                out[i, j] = out[j, i] = block.pow(2).sum().cpu()
        return out

    def matrix(self, debiased: bool = False) -> torch.Tensor:
        """``[S, S]`` CKA of all frames (``nan`` where a stream is constant)."""
        n = self.moments.n
        if n == 0:
            raise ValueError("no frames were accumulated")
        hsic = self._block_fro2()
        if debiased:
            if self.norm_frames != n:
                raise RuntimeError(f"the second pass saw {self.norm_frames} frames, the first {n}: "
                                   "feed the same batches to update_norms")
            if n < 4:
                raise ValueError(f"debiased CKA needs at least 4 frames, got {n}")
            hsic = (hsic - self.sum_dd + torch.outer(self.sum_d, self.sum_d) / ((n - 1) * (n - 2))
                    - 2.0 * self.sum_dd / (n - 2))
        diag = hsic.diagonal().clamp_min(0)
        denom = torch.sqrt(diag[:, None] * diag[None, :])
        return torch.where(denom > 0, hsic / denom.clamp_min(1e-300), torch.full_like(denom, float("nan")))

    def covariance(self, i: int) -> CovarianceAccumulator:
        """Stream ``i``'s own moments (for its PCA)."""
        a, b = self.offsets[i], self.offsets[i + 1]
        acc = CovarianceAccumulator()
        acc.n = self.moments.n
        acc.total = self.moments.total[a:b]
        acc.outer = self.moments.outer[a:b, a:b]
        return acc


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA of two ``[n, p]`` / ``[n, q]`` matrices whose rows are the same frames."""
    acc = GroupCKA([x.shape[-1], y.shape[-1]])
    acc.update_moments([x, y])
    if debiased:
        acc.update_norms([x, y])
    return float(acc.matrix(debiased)[0, 1])


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """``X Xᵀ`` in float64."""
    x = _as_acc(x)
    return x @ x.T


def center_gram(gram: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Double-centred Gram ``H K H``, or with ``unbiased`` the U-centred Gram (zero diagonal) whose inner
    product with another U-centred Gram, divided by ``n (n - 3)``, is the unbiased HSIC estimator."""
    gram = gram.to(ACC_DTYPE).clone()
    n = gram.shape[0]
    if not unbiased:
        means = gram.mean(dim=0)
        return gram - means[:, None] - means[None, :] + means.mean()
    if n < 4:
        raise ValueError(f"the unbiased estimator needs at least 4 frames, got {n}")
    gram.fill_diagonal_(0.0)
    means = gram.sum(dim=0) / (n - 2)
    means = means - means.sum() / (2 * (n - 1))
    gram = gram - means[:, None] - means[None, :]
    gram.fill_diagonal_(0.0)
    return gram


class MinibatchCKA:
    """CKA between every pair of ``S`` streams, averaging the HSIC terms over blocks of frames.

    Each :meth:`update` takes one block (the same ``m`` frames in every stream) and adds the block's
    ``⟨centre(K_i), centre(K_j)⟩`` for all pairs; :meth:`matrix` gives ``Σ H_ij / sqrt(Σ H_ii Σ H_jj)``.
    With ``debiased`` the blocks' unbiased HSIC estimates are averaged, which is unbiased for the pooled HSIC,
    so the result does not depend on the block size (up to noise). Memory: ``S`` Grams of ``m x m``.
    """

    def __init__(self, num_streams: int, debiased: bool = True) -> None:
        self.debiased = debiased
        self.hsic = torch.zeros(num_streams, num_streams, dtype=ACC_DTYPE)
        self.blocks = 0

    def update(self, streams: Sequence[torch.Tensor]) -> None:
        if len(streams) != self.hsic.shape[0]:
            raise ValueError(f"expected {self.hsic.shape[0]} streams, got {len(streams)}")
        n = streams[0].shape[0]
        if any(s.shape[0] != n for s in streams):
            raise ValueError("every stream of a block must hold the same frames")
        grams = torch.stack([center_gram(gram_linear(s), self.debiased).flatten() for s in streams])
        block = grams @ grams.T
        scale = n * (n - 3) if self.debiased else (n - 1) ** 2
        self.hsic += (block / scale).cpu()
        self.blocks += 1

    def matrix(self) -> torch.Tensor:
        """``[S, S]`` CKA (``nan`` where a stream is constant)."""
        if self.blocks == 0:
            raise ValueError("no blocks were accumulated")
        diag = self.hsic.diagonal().clamp_min(0)
        denom = torch.sqrt(diag[:, None] * diag[None, :])
        return torch.where(denom > 0, self.hsic / denom.clamp_min(1e-300), torch.full_like(denom, float("nan")))


def contained_block(x: torch.Tensor, y: torch.Tensor, sample_rows: int = 256) -> int | None:
    """Column offset at which ``x`` appears as a contiguous block of ``y``'s columns on the same frames
    (``y = [..., x, ...]``), else None. Such a pair's CKA is a ratio of block norms (see the module docstring),
    so a similarity read from it measures nothing learned. Exact equality: both come from the same stored
    values."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[1] >= y.shape[1]:
        return None
    xs, ys = x[:sample_rows], y[:sample_rows].to(x.dtype)
    p = x.shape[1]
    for offset in range(y.shape[1] - p + 1):
        if torch.equal(ys[:, offset], xs[:, 0]) and torch.equal(ys[:, offset : offset + p], xs):
            return offset if torch.equal(y[:, offset : offset + p].to(x.dtype), x) else None
    return None
