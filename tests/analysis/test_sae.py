"""Sparse autoencoders: code rules, unit-norm atoms, metrics, the planted dictionary and dead latents."""

from __future__ import annotations

import pytest
import torch

from finetune.analysis.sae_training import (
    SAEConfig,
    compressae_loss,
    evaluate_sae,
    normalised_mse,
    split_files,
    topk_loss,
    train_sae,
)
from modules import TopKSparseAutoencoder


def test_codes_have_exactly_k_non_zeros_for_both_rules():
    x = torch.randn(32, 8)
    relu = TopKSparseAutoencoder(8, 16, 3)
    with torch.no_grad():
        relu.encoder.bias.fill_(100.0)  # every pre-activation positive: the top 3 are non-zero
    assert ((relu.encode(x) != 0).sum(dim=1) == 3).all()
    signed = TopKSparseAutoencoder(8, 16, 5, signed=True)
    codes = signed.encode(x)
    assert ((codes != 0).sum(dim=1) == 5).all() and (codes < 0).any()
    pre = signed.preactivations(x)
    kept = codes != 0
    kept_min = pre.abs().masked_fill(~kept, float("inf")).min(dim=1).values
    dropped_max = pre.abs().masked_fill(kept, 0.0).max(dim=1).values
    assert (kept_min >= dropped_max).all()
    torch.testing.assert_close(codes[kept], pre[kept])


def test_decoder_atoms_have_unit_norm_after_a_training_step():
    x = torch.randn(64, 8)
    result = train_sae(x, x[:8], SAEConfig(latents=16, k=2, lr=1e-2, batch_size=64, epochs=1, eval_every=1))
    norms = result.sae.decoder.weight.norm(dim=0)
    torch.testing.assert_close(norms, torch.ones(16), rtol=0, atol=1e-6)


def test_nmse_of_the_mean_predictor_is_one_and_identity_dictionary_is_exact():
    x = torch.rand(50, 6) + 0.1
    assert float(normalised_mse(x, x.mean(dim=0).expand_as(x))) == pytest.approx(1.0, abs=1e-6)
    for signed in (False, True):
        sae = TopKSparseAutoencoder(6, 6, 6, tied_init=False, signed=signed)
        with torch.no_grad():
            for lin in (sae.encoder, sae.decoder):
                lin.weight.copy_(torch.eye(6))
                lin.bias.zero_()
        metrics = evaluate_sae(sae, x)
        assert metrics["nmse"] == pytest.approx(0.0, abs=1e-9)
        assert metrics["cosine"] == pytest.approx(1.0, abs=1e-6)
        assert metrics["explained_variance"] == pytest.approx(1.0, abs=1e-9)
        assert metrics["l0"] == 6 and metrics["dead_fraction"] == 0
    loss, _, _ = compressae_loss(sae, x)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_compressae_loss_does_not_change_when_the_input_is_rescaled():
    sae = TopKSparseAutoencoder(8, 12, 2, signed=True)
    x = torch.randn(20, 8)
    a, _, _ = compressae_loss(sae, x)
    b, _, _ = compressae_loss(sae, 37.0 * x)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _planted(n: int, seed: int, atoms: torch.Tensor, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = atoms.shape[0]
    idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)])
    values = torch.rand(n, k, generator=g) + 0.5
    codes = torch.zeros(n, m).scatter(1, idx, values)
    return codes @ atoms


def test_recovers_a_planted_sparse_dictionary_on_held_out_data_and_reports_a_forced_dead_latent():
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(24, 16, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    train, heldout = _planted(4000, 1, atoms, 3), _planted(500, 2, atoms, 3)
    cfg = SAEConfig(latents=48, k=3, lr=5e-3, adam_eps=1e-8, batch_size=256, epochs=25, eval_every=100, seed=0)
    result = train_sae(train, heldout, cfg)
    assert result.final["nmse"] < 0.1
    assert result.final["heldout_rows"] == 500
    learned = result.sae.decoder.weight.T  # [latents, d], unit rows
    best = (atoms @ learned.T).max(dim=1).values
    assert (best > 0.9).float().mean() >= 0.9, best
    # force the most used latent dead: the held-out dead fraction grows by exactly one latent
    codes = result.sae.encode(heldout)
    used = int((codes != 0).sum(dim=0).argmax())
    before = result.final["dead_fraction"]
    with torch.no_grad():
        result.sae.encoder.bias[used] = -torch.inf
    after = evaluate_sae(result.sae, heldout)["dead_fraction"]
    assert after == pytest.approx(before + 1 / 48)


def test_auxk_loss_only_with_dead_latents():
    sae = TopKSparseAutoencoder(8, 16, 2)
    x = torch.randn(32, 8)
    cfg = SAEConfig(latents=16, k=2)
    _, parts, _ = topk_loss(sae, x, torch.zeros(16, dtype=torch.bool), cfg)
    assert parts["auxk"] == 0
    dead = torch.zeros(16, dtype=torch.bool)
    dead[:5] = True
    _, parts, _ = topk_loss(sae, x, dead, cfg)
    assert parts["auxk"] > 0


def test_checkpoint_round_trip(tmp_path):
    sae = TopKSparseAutoencoder(8, 16, 3, signed=True)
    sae.save(tmp_path / "sae.safetensors", stream="z")
    back = TopKSparseAutoencoder.load(tmp_path / "sae.safetensors")
    assert back.signed and back.k == 3 and back.metadata["stream"] == "z"
    x = torch.randn(5, 8)
    torch.testing.assert_close(back(x).reconstruction, sae(x).reconstruction, rtol=0, atol=0)


def test_file_split_is_by_name_and_keeps_both_sides():
    files = [f"f{i}.wav" for i in range(10)]
    held = split_files(files, 0.2, seed=1)
    assert len(held) == 2 and held == split_files(list(reversed(files)), 0.2, seed=1)
    assert len(split_files(files[:2], 0.9)) == 1
    assert split_files(files, 0.0) == set()
    moved = {f"/elsewhere/data/{f}" for f in held}
    assert split_files([f"/elsewhere/data/{f}" for f in files], 0.2, seed=1) == moved


def test_ae_train_splits_a_folder_without_held_out_marks_by_file(tmp_path):
    import json

    from finetune.analysis.shards import ShardWriter
    from tests.helpers.scripts import load_script

    writer = ShardWriter(tmp_path / "states", {"streams": {"s": {"dim": 6}}}, shard_bytes=1)
    g = torch.Generator().manual_seed(0)
    for b in range(10):
        writer.add(b, {"file": torch.full((20,), writer.file_index(f"/data/f{b}.wav"), dtype=torch.int32),
                       "frame": torch.arange(20, dtype=torch.int32), "s": torch.randn(20, 6, generator=g)}, ["s"])
    writer.finish()
    script = load_script("ae_train")
    out = tmp_path / "sae"
    assert script.main([str(tmp_path / "states"), "--out", str(out), "--latents", "8", "--k", "2", "--epochs", "1",
                        "--batch-size", "64", "--heldout-fraction", "0.2", "--device", "cpu"]) == 0
    m = json.loads((out / "metrics.json").read_text())["streams"]["s"]
    assert (m["train_files"], m["heldout_files"], m["train_rows"], m["heldout_rows"]) == (8, 2, 160, 40)
