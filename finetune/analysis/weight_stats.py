"""Weight statistics of a checkpoint read straight from its safetensors file, with no model built.

A training export is ``consolidated/`` with ``lora.safetensors`` (LoRA adapters only) or
``consolidated.safetensors`` (all weights: full, merged or DSAA) beside ``config.json``. Tensors are read one
at a time, so a 7B checkpoint never has to fit in memory twice.

For a LoRA pair the update is ``ΔW = scaling · B A`` with ``A [r, in]`` and ``B [out, r]``. Its singular values
come from the ``r × r`` core: with ``B = Q_b R_b`` and ``Aᵀ = Q_a R_a`` (thin QR), ``ΔW = Q_b (scaling · R_b
R_aᵀ) Q_aᵀ`` and the orthonormal factors keep singular values, so the ``out × in`` matrix is never formed.
The effective rank is ``exp(H(p))`` with ``p_i = s_i / Σ s_j``: ``r`` exactly for ``r`` equal singular values,
lower when a few directions dominate.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

WEIGHT_FILES = ("lora.safetensors", "consolidated.safetensors", "model.safetensors")
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
_NUMBERED = re.compile(r"^(.*?\.\d+)(\.|$)")


class CheckpointReadError(ValueError):
    """A path is not a checkpoint this module can read; the message names it and what was looked for."""


@dataclass
class CheckpointFile:
    """One checkpoint's weights file and ``config.json`` (``{}`` when there is none)."""

    weights: Path
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def is_lora(self) -> bool:
        return self.weights.name == "lora.safetensors"

    @property
    def lora_scaling(self) -> float:
        """``lora_scaling`` of ``config.json``; 1.0 (with the update then reported unscaled) if absent."""
        return float(self.config.get("lora_scaling", 1.0))

    @property
    def is_dsaa(self) -> bool:
        return "dsaa" in self.config

    def names(self) -> list[str]:
        with safe_open(str(self.weights), framework="pt") as f:
            return sorted(f.keys())

    def tensors(self, device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, float32 tensor on device)`` one at a time, in sorted name order."""
        with safe_open(str(self.weights), framework="pt") as f:
            for name in sorted(f.keys()):
                yield name, f.get_tensor(name).to(device).float()


def find_checkpoint(path: str | Path) -> CheckpointFile:
    """The weights and config of a run's ``checkpoint_N/``, its ``consolidated/``, a DSAA checkpoint folder or a
    ``.safetensors`` file (its folder's ``config.json`` is read when present).

    Raises:
        CheckpointReadError: nothing readable at ``path``.
    """
    path = Path(path)
    if path.is_dir() and (path / "consolidated").is_dir():
        path = path / "consolidated"
    if path.is_dir():
        found = [path / n for n in WEIGHT_FILES if (path / n).is_file()]
        if not found:
            raise CheckpointReadError(f"{path}: no {' / '.join(WEIGHT_FILES)} in this folder")
        weights = found[0]
    elif path.is_file() and path.suffix == ".safetensors":
        weights = path
    else:
        raise CheckpointReadError(f"{path}: not a checkpoint folder or a .safetensors file")
    config_path = weights.parent / "config.json"
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise CheckpointReadError(f"{config_path}: not valid JSON ({e})") from None
    return CheckpointFile(weights, config)


def layer_of(name: str) -> str:
    """The group a tensor's norm is summed into: its name up to the first numbered component
    (``transformer.layers.3.gating.linear_in.weight`` → ``transformer.layers.3``), else its first component."""
    m = _NUMBERED.match(name)
    return m.group(1) if m else name.split(".", 1)[0]


def effective_rank(singular_values: torch.Tensor) -> float:
    """``exp`` of the entropy of the normalised singular values (0 for a zero matrix)."""
    s = singular_values.double().clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def lora_singular_values(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Singular values (descending) of ``scaling · B A`` from the ``r × r`` core of the two thin QRs."""
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"LoRA factors must be A [r, in], B [out, r]; got {tuple(lora_a.shape)}, "
                         f"{tuple(lora_b.shape)}")
    _, r_b = torch.linalg.qr(lora_b.double())
    _, r_a = torch.linalg.qr(lora_a.double().t())
    return torch.linalg.svdvals(scaling * (r_b @ r_a.t())).float()


def tensor_rows(ckpt: CheckpointFile, device: torch.device | str = "cpu", progress: bool = False
                ) -> list[dict[str, Any]]:
    """One row per tensor: name, layer group, shape, element count, Frobenius norm, RMS (and value if scalar)."""
    rows = []
    for name, t in tqdm(ckpt.tensors(device), total=len(ckpt.names()), desc="norms", disable=not progress):
        norm = float(torch.linalg.vector_norm(t.double()))
        row: dict[str, Any] = {"name": name, "layer": layer_of(name), "shape": "x".join(map(str, t.shape)),
                               "numel": t.numel(), "norm": norm,
                               "rms": norm / math.sqrt(t.numel()) if t.numel() else 0.0}
        if t.numel() == 1:
            row["value"] = float(t.reshape(()))
        rows.append(row)
    return rows


def layer_rows(rows: list[dict[str, Any]], value: str = "norm") -> list[dict[str, Any]]:
    """Per layer group: ``sqrt(Σ value²)`` over its tensors (the norm of the concatenated weights) and counts."""
    groups: dict[str, list[float]] = {}
    numel: dict[str, int] = {}
    for r in rows:
        groups.setdefault(r["layer"], []).append(r[value])
        numel[r["layer"]] = numel.get(r["layer"], 0) + int(r.get("numel", 0))
    return [{"layer": k, "tensors": len(v), "numel": numel[k], value: math.sqrt(sum(x * x for x in v))}
            for k, v in groups.items()]


def lora_rows(ckpt: CheckpointFile, top: int = 4, device: torch.device | str = "cpu", progress: bool = False
              ) -> list[dict[str, Any]]:
    """Per adapted Linear: rank, ``‖scaling · B A‖_F``, its spectral norm, effective rank and top singular values.

    Raises:
        CheckpointReadError: an ``A`` factor without its ``B`` (or the reverse).
    """
    names = set(ckpt.names())
    prefixes = sorted({n[: -len(LORA_A)] for n in names if n.endswith(LORA_A)}
                      | {n[: -len(LORA_B)] for n in names if n.endswith(LORA_B)})
    rows = []
    with safe_open(str(ckpt.weights), framework="pt") as f:
        for prefix in tqdm(prefixes, desc="LoRA spectra", disable=not progress):
            a_name, b_name = prefix + LORA_A, prefix + LORA_B
            if a_name not in names or b_name not in names:
                raise CheckpointReadError(f"{ckpt.weights}: {prefix} has only one of lora_A / lora_B")
            s = lora_singular_values(f.get_tensor(a_name).to(device), f.get_tensor(b_name).to(device),
                                     ckpt.lora_scaling).cpu()
            row: dict[str, Any] = {"module": prefix, "layer": layer_of(prefix), "rank": int(s.numel()),
                                   "update_norm": float(torch.linalg.vector_norm(s.double())),
                                   "spectral_norm": float(s[0]) if s.numel() else 0.0,
                                   "effective_rank": effective_rank(s)}
            for i in range(top):
                row[f"sv{i + 1}"] = float(s[i]) if i < s.numel() else None
            rows.append(row)
    return rows


def change_rows(a: CheckpointFile, b: CheckpointFile, device: torch.device | str = "cpu", progress: bool = False
                ) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Per tensor present in both: ``‖b − a‖``, ``‖a‖`` and the relative change ``‖b − a‖ / ‖a‖`` (None when
    ``a`` is zero); plus the names only in ``a``, only in ``b`` and those whose shapes differ."""
    names_a, names_b = set(a.names()), set(b.names())
    common = sorted(names_a & names_b)
    rows, mismatched = [], []
    with safe_open(str(a.weights), framework="pt") as fa, safe_open(str(b.weights), framework="pt") as fb:
        for name in tqdm(common, desc="change", disable=not progress):
            ta, tb = fa.get_tensor(name).to(device).float(), fb.get_tensor(name).to(device).float()
            if ta.shape != tb.shape:
                mismatched.append(name)
                continue
            norm_a = float(torch.linalg.vector_norm(ta))
            diff = float(torch.linalg.vector_norm(tb - ta))
            rows.append({"name": name, "layer": layer_of(name), "norm_a": norm_a,
                         "norm_b": float(torch.linalg.vector_norm(tb)), "diff_norm": diff,
                         "relative_change": diff / norm_a if norm_a > 0 else None})
    missing = {"only_in_a": sorted(names_a - names_b), "only_in_b": sorted(names_b - names_a),
               "shape_mismatch": mismatched}
    return rows, missing


def layer_change_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layer group: ``‖Δ‖ / ‖a‖`` over its tensors together (None when the group is zero in ``a``)."""
    diff: dict[str, float] = {}
    base: dict[str, float] = {}
    for r in rows:
        diff[r["layer"]] = diff.get(r["layer"], 0.0) + r["diff_norm"] ** 2
        base[r["layer"]] = base.get(r["layer"], 0.0) + r["norm_a"] ** 2
    return [{"layer": k, "diff_norm": math.sqrt(d), "norm_a": math.sqrt(base[k]),
             "relative_change": math.sqrt(d / base[k]) if base[k] > 0 else None} for k, d in diff.items()]


def scalar_parameters(rows: list[dict[str, Any]], suffix: str = "alpha") -> dict[str, float]:
    """The one-element tensors whose name ends with ``suffix`` (DSAA's projector gate ``alpha``)."""
    return {r["name"]: r["value"] for r in rows if "value" in r and r["name"].rsplit(".", 1)[-1] == suffix}
