"""Weight statistics read from safetensors: LoRA update spectra, effective rank, norms and relative change."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from finetune.analysis.weight_stats import (
    CheckpointReadError,
    effective_rank,
    find_checkpoint,
    layer_of,
    lora_rows,
    lora_singular_values,
    tensor_rows,
)
from tests.helpers.scripts import run_script


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return (q if rows >= cols else q.t()).float()


def _planted_lora(out: int, inp: int, rank: int, planted: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors A [rank, in], B [out, rank] whose product has `planted` equal non-zero singular values."""
    a = _orthonormal(rank, inp, seed)
    b = torch.zeros(out, rank)
    b[:, :planted] = scale * _orthonormal(out, planted, seed + 1)
    return a, b


@pytest.mark.parametrize("planted", [1, 3, 8])
def test_effective_rank_of_a_planted_rank_r_update_is_r(planted):
    a, b = _planted_lora(40, 24, rank=8, planted=planted, scale=0.7, seed=planted)
    s = lora_singular_values(a, b, scaling=2.0)
    assert s.shape == (8,)
    torch.testing.assert_close(s[:planted], torch.full((planted,), 1.4), rtol=1e-5, atol=0)
    assert all(float(v) < 1e-6 for v in s[planted:])
    assert effective_rank(s) == pytest.approx(planted, rel=1e-5)


def test_lora_singular_values_equal_those_of_the_formed_update():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 30, generator=g), torch.randn(50, 6, generator=g)
    want = torch.linalg.svdvals(2.5 * (b.double() @ a.double())).float()[:6]
    # float64 QR + SVD of the 6 x 6 core against float64 SVD of the 50 x 30 product: rounding only.
    torch.testing.assert_close(lora_singular_values(a, b, 2.5), want, rtol=1e-6, atol=1e-6)


def test_effective_rank_values():
    assert effective_rank(torch.ones(5)) == pytest.approx(5.0)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(4)) == 0.0
    p = torch.tensor([0.5, 0.25, 0.25])
    assert effective_rank(torch.tensor([2.0, 1.0, 1.0])) == pytest.approx(math.exp(float(-(p * p.log()).sum())))


def test_layer_groups():
    assert layer_of("transformer.layers.3.gating.linear_in.weight") == "transformer.layers.3"
    assert layer_of("depformer_projectors.2.fc1.weight") == "depformer_projectors.2"
    assert layer_of("text_projector.alpha") == "text_projector"
    assert layer_of("out_norm.alpha") == "out_norm"


def _write_lora(folder: Path, tensors: dict[str, torch.Tensor], scaling: float) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "lora.safetensors"))
    (folder / "config.json").write_text(json.dumps({"lora": True, "lora_rank": 8, "lora_scaling": scaling}))
    return folder


def _lora_tensors(seed: int) -> dict[str, torch.Tensor]:
    out = {}
    for i, planted in enumerate((2, 5)):
        a, b = _planted_lora(32, 16, rank=8, planted=planted, scale=0.5, seed=seed + i)
        out[f"transformer.layers.{i}.self_attn.out_proj.lora_A.weight"] = a
        out[f"transformer.layers.{i}.self_attn.out_proj.lora_B.weight"] = b
    return out


def test_norms_and_lora_rows_of_a_checkpoint_folder(tmp_path):
    tensors = _lora_tensors(0)
    ckpt = find_checkpoint(_write_lora(tmp_path / "checkpoint_000010" / "consolidated", tensors, 2.0).parent)
    assert ckpt.is_lora and ckpt.lora_scaling == 2.0
    rows = {r["name"]: r for r in tensor_rows(ckpt)}
    for name, t in tensors.items():
        assert rows[name]["norm"] == pytest.approx(float(t.double().norm()), rel=1e-6)
        assert rows[name]["shape"] == "x".join(map(str, t.shape))
    lora = {r["module"]: r for r in lora_rows(ckpt, top=3)}
    assert [round(lora[f"transformer.layers.{i}.self_attn.out_proj"]["effective_rank"], 4) for i in (0, 1)] == [2, 5]
    assert lora["transformer.layers.0.self_attn.out_proj"]["sv1"] == pytest.approx(1.0, rel=1e-5)  # 2.0 * 0.5


def test_unreadable_checkpoints_are_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointReadError, match="empty: no lora.safetensors"):
        find_checkpoint(tmp_path / "empty")
    tensors = _lora_tensors(0)
    del tensors["transformer.layers.1.self_attn.out_proj.lora_B.weight"]
    ckpt = find_checkpoint(_write_lora(tmp_path / "half", tensors, 1.0))
    with pytest.raises(CheckpointReadError, match="layers.1.self_attn.out_proj has only one of lora_A / lora_B"):
        lora_rows(ckpt)


def test_analyze_state_script_writes_tables_plots_and_relative_change(tmp_path, capsys):
    tensors = _lora_tensors(0)
    a = _write_lora(tmp_path / "a", tensors, 2.0)
    b = _write_lora(tmp_path / "b", {k: 1.25 * v for k, v in tensors.items()}, 2.0)
    out = tmp_path / "out"
    assert run_script("analyze_state", str(a), str(b), "--out", str(out), "--device", "cpu") == 0
    for name in ("tensors.csv", "layers.csv", "lora.csv", "change.csv", "change_layers.csv", "summary.json",
                 "layer_norms.png", "lora_updates.png", "relative_change.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "change.csv") as f:
        change = list(csv.DictReader(f))
    assert len(change) == len(tensors)
    assert all(float(r["relative_change"]) == pytest.approx(0.25, rel=1e-6) for r in change)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "lora" and summary["lora"]["modules"] == 2
    assert summary["change"]["only_in_a"] == [] and summary["provenance"]["checkpoints"]
    assert "LoRA updates" in capsys.readouterr().out
