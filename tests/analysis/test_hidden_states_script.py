"""get_hidden_states.py and analyze_states.py on the tiny Moshi LoRA and DSAA runs."""

from __future__ import annotations

import json

import torch

from finetune.analysis.shards import ShardSet
from tests.helpers.scripts import load_script


def test_moshi_lora_checkpoint(moshi_lora_run, tmp_path, capsys):
    config, checkpoint = moshi_lora_run
    out = tmp_path / "states"
    args = [str(config), "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu",
            "--layers", "0,-1", "--timed-batches", "2"]
    assert load_script("get_hidden_states").main(args) == 0
    printed = capsys.readouterr().out
    assert "plain forward" in printed and "extraction" in printed
    shards = ShardSet(out)
    assert shards.complete and set(shards.streams) == {"layer.0", "layer.1", "out_norm"}
    rows = shards.load(["out_norm"])
    assert rows["out_norm"].dtype == torch.bfloat16 and rows["out_norm"].shape[1] == 64
    record = json.loads((out / "extraction.rank0.json").read_text())
    assert record["timing"]["timed_batches"] == 2 and record["batches_stored"] == 2


def test_dsaa_checkpoint(dsaa_run, tmp_path):
    config, checkpoint = dsaa_run
    out = tmp_path / "states"
    assert load_script("get_hidden_states").main(
        [str(config), "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu", "--layers", "-1",
         "--store-dtype", "float32"]) == 0
    shards = ShardSet(out)
    streams = shards.streams
    assert {"a", "h", "text_proj", "alpha_fusion", "dep_proj.0"} <= set(streams)
    assert not streams["h"]["depends_on_training"] and streams["text_proj"]["depends_on_training"]
    rows = shards.load(["h", "text_proj", "alpha_fusion"])
    torch.testing.assert_close(rows["text_proj"], rows["h"] + rows["alpha_fusion"], rtol=1e-5, atol=1e-5)


def test_analyze_states_compares_streams_and_two_checkpoints(moshi_lora_run, tmp_path):
    config, checkpoint = moshi_lora_run
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    for out, extra in ((base, []), (tuned, ["--checkpoint", str(checkpoint)])):
        assert load_script("get_hidden_states").main(
            [str(config), "--out", str(out), "--device", "cpu", "--timed-batches", "0", "--store-dtype",
             "float32", *extra]) == 0
    out = tmp_path / "analysis"
    assert load_script("analyze_states").main([str(base), str(tuned), "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads((out / "cka.json").read_text())
    labels = result["streams"]
    assert labels == ["A:layer.0", "A:layer.1", "A:out_norm", "B:layer.0", "B:layer.1", "B:out_norm"]
    cka = torch.tensor(result["cka"])
    torch.testing.assert_close(cka.diagonal(), torch.ones(6, dtype=cka.dtype), rtol=0, atol=1e-9)
    # the same frames of one run against a 2-step LoRA of it: similar but not identical
    runs = {r["stream"]: r for r in result["runs"]}
    assert 0.5 < runs["out_norm"]["cka"] < 1 - 1e-6
    assert result["unmatched_frames_of_a"] == 0 and result["frames"] > 0
    for name in ("cka.csv", "runs.csv", "pca.csv", "cka_plugin.png", "cka_debiased.png", "pca_variance.png",
                 "pca_2d.png"):
        assert (out / name).stat().st_size > 0
    pca = result["pca"]["A:out_norm"]
    assert 1 <= pca["components_90"] <= pca["components_95"] <= 64

    mini = tmp_path / "mini"
    assert load_script("analyze_states").main([str(base), "--out", str(mini), "--minibatch", "16",
                                           "--streams", "layer.1,out_norm"]) == 0
    assert json.loads((mini / "cka.json").read_text())["mode"] == "minibatch"


def test_ranks_share_the_batches_of_one_process(moshi_lora_run, tmp_path, monkeypatch):
    config, _ = moshi_lora_run
    common = ["--device", "cpu", "--timed-batches", "0", "--layers", "-1", "--store-dtype", "float32"]
    assert load_script("get_hidden_states").main([str(config), "--out", str(tmp_path / "one"), *common]) == 0
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert load_script("get_hidden_states").main([str(config), "--out", str(tmp_path / "two"), *common]) == 0
    two = ShardSet(tmp_path / "two")
    assert sorted(two.batches) == [(0, 0), (1, 0)]
    assert {p.name.split("-")[1] for p in (tmp_path / "two").glob("shard-*")} == {"r000", "r001"}

    def frames(shards):
        rows = shards.load(["out_norm", "frame"])
        keys = [(shards.files[f], int(t)) for f, t in zip(rows["file"].tolist(), rows["frame"])]
        return dict(zip(keys, rows["out_norm"]))

    one, split = frames(ShardSet(tmp_path / "one")), frames(two)
    assert split.keys() == one.keys()
    for key in one:  # batches of 2 regrouped across ranks: same frames, other batch companions
        torch.testing.assert_close(split[key], one[key], rtol=1e-5, atol=1e-5)
