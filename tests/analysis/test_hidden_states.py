"""Hidden-state extraction on tiny models: the recorded streams, the stored rows, and resuming."""

from __future__ import annotations

import pytest
import torch

from finetune.analysis.hidden_states import (
    BatchInfo,
    StateRecorder,
    extract,
    header_streams,
    hidden_state_fn,
    recorded_forward,
    stream_specs,
)
from finetune.analysis.shards import ShardSet, ShardWriter
from moshi.models.dsaa import dsaa_states
from moshi.models.lm import delay_codes
from tests.dsaa.tiny_llm import random_codes, tiny_dsaa
from tests.helpers.models import filled_small_lm

PAD, EPAD = 3, 0


def _batches(model, count: int, batch: int = 2, steps: int = 6) -> list[BatchInfo]:
    out = []
    for i in range(count):
        codes = random_codes(model, batch, steps, seed=i) if hasattr(model, "text_llm") else (
            torch.randint(0, 32, (batch, model.num_codebooks, steps), generator=torch.Generator().manual_seed(i)))
        if not hasattr(model, "text_llm"):
            codes[:, 0] = torch.randint(0, 100, (batch, steps), generator=torch.Generator().manual_seed(50 + i))
        codes[0, 0, :2] = PAD
        codes[-1, :, -2:] = -1  # the end of a partial chunk: no text, no audio
        out.append(BatchInfo(i, codes, [f"file{i}_{b}.wav" for b in range(batch)], [5 * b for b in range(batch)]))
    return out


def test_moshi_streams_are_the_layer_outputs_and_out_norm():
    model = filled_small_lm()
    specs = stream_specs(model, layers=[0, -1])
    assert [s.name for s in specs] == ["layer.0", "layer.1", "out_norm"]
    codes = _batches(model, 1)[0].codes.clamp_min(0)
    states = recorded_forward(model, StateRecorder(model, specs), codes)
    delayed = delay_codes(codes, model.delays, model.initial_tokens())
    z, _ = model.frame_states(delayed[:, :, :-1])
    torch.testing.assert_close(states["out_norm"], z, rtol=0, atol=0)  # same op, same shapes
    assert states["layer.0"].shape == (2, 6, model.dim)
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        stream_specs(model, layers=[5])


def test_dsaa_streams_split_the_text_projector_and_mark_frozen_ones():
    model = tiny_dsaa()
    specs = stream_specs(model, layers=[-1])
    names = [s.name for s in specs]
    assert names == ["layer.1", "a", "h", "text_proj", "alpha_fusion", "dep_proj.0", "dep_proj.1"]
    changing = {s.name for s in specs if s.depends_on_training}
    assert changing == {"text_proj", "alpha_fusion", "dep_proj.0", "dep_proj.1"}
    codes = random_codes(model, 2, 6)
    states = recorded_forward(model, StateRecorder(model, specs), codes)
    # the projector output is h plus its correction (float32 rounding of one addition)
    torch.testing.assert_close(states["text_proj"], states["h"] + states["alpha_fusion"], rtol=1e-6, atol=1e-6)
    delayed = delay_codes(codes, model.delays, model.initial_tokens())
    h, a = dsaa_states(model, delayed[:, :, :-1])
    torch.testing.assert_close(states["h"], h, rtol=0, atol=0)
    torch.testing.assert_close(states["a"], a, rtol=0, atol=0)
    assert states["dep_proj.1"].shape == (2, 6, model.depformer_dim)
    assert not torch.equal(states["dep_proj.0"], states["dep_proj.1"])


def _extract(model, folder, batches, **kw):
    specs = stream_specs(model, layers=[0])
    writer = ShardWriter(folder, {"streams": header_streams(specs)}, shard_bytes=1, stream_dtype=torch.bfloat16)
    timing = extract(model, hidden_state_fn(model, specs), batches, writer, frame_rate=12.5, pad_id=PAD, epad_id=EPAD, **kw)
    writer.finish(**timing.as_dict())
    return timing


def test_rows_are_the_valid_frames_with_their_file_frame_and_masks(tmp_path):
    model = filled_small_lm()
    batches = _batches(model, 2)
    timing = _extract(model, tmp_path, batches, timed_batches=2)
    assert timing.batches == 2 and timing.plain_s > 0 and timing.extract_s > 0
    rows = ShardSet(tmp_path).load(["out_norm", "frame", "time", "pad", "speech", "text"])
    assert rows["out_norm"].shape == (2 * (12 - 2), model.dim) and rows["out_norm"].dtype == torch.bfloat16
    files = ShardSet(tmp_path).files
    first = [i for i, f in enumerate(rows["file"].tolist()) if files[f] == "file0_1.wav"]
    assert rows["frame"][first].tolist() == [5, 6, 7, 8]  # start frame 5, the last two frames are -1
    torch.testing.assert_close(rows["time"][first], torch.tensor([5, 6, 7, 8]) / 12.5)
    zero = [i for i, f in enumerate(rows["file"].tolist()) if files[f] == "file0_0.wav"]
    assert rows["pad"][zero].tolist()[:2] == [1, 1] and rows["speech"][zero].tolist()[:2] == [0, 0]
    assert (rows["speech"] + rows["pad"] <= 1).all()


def test_an_interrupted_extraction_resumes_without_duplicate_or_missing_batches(tmp_path):
    model = filled_small_lm()
    batches = _batches(model, 5)
    _extract(model, tmp_path / "whole", batches)

    def crash(index: int) -> None:
        if index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _extract(model, tmp_path / "resumed", batches, on_batch=crash)
    assert sorted(b for _, b in ShardSet(tmp_path / "resumed").batches) == [0, 1, 2]
    seen = []
    _extract(model, tmp_path / "resumed", batches, on_batch=seen.append)
    assert seen == [3, 4]
    whole, resumed = ShardSet(tmp_path / "whole"), ShardSet(tmp_path / "resumed")
    assert sorted(resumed.batches) == sorted(whole.batches) == [(0, b) for b in range(5)]
    a, b = whole.load(["layer.0", "out_norm", "frame"]), resumed.load(["layer.0", "out_norm", "frame"])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)  # same forward on the same batches
