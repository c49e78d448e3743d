"""get_vectors.py and ae_train.py on the tiny DSAA run."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.analysis.shards import ShardSet
from modules import TopKSparseAutoencoder
from tests.helpers.scripts import load_script


@pytest.fixture(scope="module")
def vectors(dsaa_run, tmp_path_factory):
    config, checkpoint = dsaa_run
    out = tmp_path_factory.mktemp("vectors")
    assert load_script("get_vectors").main(
        [str(config), "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
         "--frame-fraction", "0.5", "--heldout-fraction", "0.25", "--max-batches", "100", "--timed-batches", "1"]) == 0
    return out


def test_vectors_are_the_projector_inputs_subsampled_and_split_by_file(vectors):
    shards = ShardSet(vectors)
    header = shards.header
    assert set(header["composites"]) == {"dep_proj_in.0", "dep_proj_in.1", "dep_proj_in.2", "dep_proj_in.3"}
    rows = shards.load(["z", "dep_proj_in.1", "heldout", "frame"])
    assert rows["z"].dtype == torch.float16
    held_files = {shards.files[i] for i in rows["file"][rows["heldout"].bool()].tolist()}
    train_files = {shards.files[i] for i in rows["file"][~rows["heldout"].bool()].tolist()}
    assert held_files and train_files and not held_files & train_files
    assert held_files <= set(header["heldout_files"])
    torch.testing.assert_close(rows["dep_proj_in.1"][:, : rows["z"].shape[1]], rows["z"], rtol=0, atol=0)
    # about half of the frames are kept: at most 25 valid frames per sample, and a binomial draw around 0.5
    stored = len(shards.batches) * 2 * 25
    assert 0.3 * stored < len(rows["z"]) < 0.6 * stored
    # e.0 is the embedding of the frame's text token: equal wherever the token is
    tokens = shards.load(["text", "e.0"])
    for token in torch.unique(tokens["text"])[:5]:
        same = tokens["e.0"][tokens["text"] == token]
        torch.testing.assert_close(same, same[:1].expand_as(same), rtol=0, atol=0)


def test_ae_train_writes_loadable_checkpoints_and_held_out_metrics(vectors, tmp_path):
    out = tmp_path / "sae"
    assert load_script("ae_train").main(
        [str(vectors), "--out", str(out), "--streams", "z,dep_proj_in.0", "--latents", "z=64,dep_proj_in.0=32",
         "--k", "4", "--lr", "1e-3", "--batch-size", "32", "--epochs", "2", "--eval-every", "2",
         "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["streams"]
    for stream, latents in (("z", 64), ("dep_proj_in.0", 32)):
        m = metrics[stream]
        assert 0 < m["l0"] <= 4 and 0 <= m["dead_fraction"] <= 1 and m["heldout_rows"] >= 2
        assert m["nmse"] == pytest.approx(1 - m["explained_variance"], abs=0.2)
        sae = TopKSparseAutoencoder.load(out / f"sae.{stream}.safetensors")
        assert sae.latent_dim == latents and sae.k == 4 and sae.metadata["stream"] == stream
    assert (out / "curves.png").stat().st_size > 0 and (out / "metrics.csv").exists()

    signed = tmp_path / "compressae"
    assert load_script("ae_train").main(
        [str(vectors), "--out", str(signed), "--streams", "z", "--objective", "compressae", "--latents", "16",
         "--k", "2", "--lr", "1e-3", "--batch-size", "32", "--epochs", "1", "--device", "cpu"]) == 0
    assert TopKSparseAutoencoder.load(signed / "sae.z.safetensors").signed


def test_analyze_states_warns_that_z_is_a_block_of_each_depformer_input(vectors, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert load_script("analyze_states").main([str(vectors), "--out", str(out), "--streams", "z,dep_proj_in.0,e.0"]) == 0
    result = json.loads((out / "cka.json").read_text())
    assert result["warnings"] == [
        f"z is columns 0..{result['dims'][0] - 1} of dep_proj_in.0: their CKA is a ratio of block norms, "
        "not a similarity of representations",
        f"e.0 is columns {result['dims'][0]}..{result['dims'][1] - 1} of dep_proj_in.0: their CKA is a ratio "
        "of block norms, not a similarity of representations",
    ]
    assert "warning: z is columns" in capsys.readouterr().err
