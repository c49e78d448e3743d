"""The batched generator: a conversation joining a slot resets that slot only (Moshi and DSAA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moshi.models.model_loading import load_model
from moshi.server.engine import BatchEngine, SamplingSettings, SlotLMGen
from tests.helpers import checkpoints as ck

from .wire import FRAME, speech

GREEDY = SamplingSettings(temp=0.0, temp_text=0.0)
STEPS = 8


@pytest.fixture(scope="module")
def dsaa_model(server_assets, tmp_path_factory):
    from tests.dsaa.tiny_llm import tiny_dsaa, train_tokenizer

    model = tiny_dsaa(card=64, n_q=8, dep_q=4, delays=[0] + [0, 1, 1, 1] * 2)
    folder = ck.write_dsaa_checkpoint(tmp_path_factory.mktemp("dsaa") / "consolidated", model, train_tokenizer())
    return load_model(folder, hf_repo=str(server_assets), device="cpu")


def _frames(seed: int) -> list[np.ndarray]:
    pcm = speech(STEPS * FRAME / 24000)
    pcm = np.roll(pcm, seed * 4000) * (1.0 + 0.2 * seed)
    return [pcm[i * FRAME : (i + 1) * FRAME].astype(np.float32) for i in range(STEPS)]


def _conversations(loaded, schedule):
    """Runs a 2-slot engine; ``schedule[t]`` maps slot -> (frames, join?) at step t. Returns per-slot outputs."""
    engine = BatchEngine(SlotLMGen(loaded.lm, 2), loaded.mimi, 2)
    try:
        engine.warm_up(frames=2)
        outputs = {0: [], 1: []}
        for step in schedule:
            frames = {slot: frame for slot, (frame, _) in step.items()}
            joins = {slot: GREEDY for slot, (_, join) in step.items() if join}
            result = engine.step(frames, joins)
            for slot in step:
                outputs[slot].append(result.get(slot))
        return outputs, engine.can_pause
    finally:
        engine.close()


@pytest.mark.parametrize("model", ["moshi", "dsaa"])
def test_a_join_resets_only_its_slot(model, tiny_model, dsaa_model):
    loaded = tiny_model if model == "moshi" else dsaa_model
    a, b, c = _frames(0), _frames(1), _frames(2)
    # slot 0 talks throughout; slot 1 hosts conversation b, then conversation c joins it at step 4
    mixed = [{0: (a[t], t == 0), 1: (b[t], t == 0) if t < 4 else (c[t - 4], t == 4)} for t in range(STEPS)]
    alone = [{0: (a[t], t == 0)} for t in range(STEPS)]  # slot 1 idle (paused)
    fresh = [{0: (c[t], t == 0)} for t in range(STEPS - 4)]
    mixed_out, can_pause = _conversations(loaded, mixed)
    alone_out, _ = _conversations(loaded, alone)
    fresh_out, _ = _conversations(loaded, fresh)
    assert can_pause

    def same(outs_x, outs_y):
        assert [o is None for o in outs_x] == [o is None for o in outs_y]
        for x, y in zip(outs_x, outs_y):
            if x is not None:
                assert x.text_id == y.text_id
                # Same kernels on the same shapes; only the other batch row's content (or exec mask) differs,
                # which batched float32 kernels may round differently in the last bits.
                torch.testing.assert_close(torch.from_numpy(x.pcm), torch.from_numpy(y.pcm), rtol=1e-4, atol=1e-5)

    assert mixed_out[0][0] is None and mixed_out[0][1] is not None  # first reply after the second frame
    same(mixed_out[0], alone_out[0])  # b joining and c replacing it never touched slot 0
    same(mixed_out[1][4:], fresh_out[0])  # after its reset, c in slot 1 is c in a fresh engine
