"""Every constructor call Kyutai's ``LMModel`` accepts builds the same module tree here.

The configuration is the one Kyutai's own LM test uses; it names no ``depformer_num_layers`` or
``depformer_hidden_scale``, so those take the temporal transformer's values. The expected table follows the
rules of the state-dict key tables: one ``depformer_in`` per weight set of the schedule, ``dep_q - 1``
depformer audio tables, low-rank tables ``[rows, r]`` plus ``low_rank [D, r]``, LayerNorm ``weight``/``bias``
for the default norm, a non-gated FFN ``linear1``/``linear2`` of width ``hidden_scale * dim`` in the temporal
transformer, and a gated depformer FFN (``2 * dim_feedforward // 3`` hidden) with one set per schedule entry.
"""

from __future__ import annotations

import torch

from moshi.models.lm import LMModel

KYUTAI_TEST_KWARGS = dict(
    delays=[0, 1, 2, 4],
    n_q=3,
    dep_q=3,
    card=32,
    text_card=33,
    dim=16,
    num_layers=2,
    num_heads=1,
    hidden_scale=1,
    depformer_dim=16,
    depformer_multi_linear=True,
    depformer_weights_per_step=True,
    depformer_weights_per_step_schedule=[0, 1, 1],
    depformer_low_rank_embeddings=8,
    depformer_num_heads=1,
    depformer_gating="silu",
    context=4,
)


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    table: dict[str, tuple[int, ...]] = {f"emb.{a}.weight": (33, 16) for a in range(3)}
    table["text_emb.weight"] = (34, 16)
    table["text_linear.weight"] = (33, 16)
    for i in range(2):
        p = f"transformer.layers.{i}."
        table[p + "self_attn.out_projs.0.weight"] = (16, 16)
        table[p + "self_attn.in_projs.0.weight"] = (48, 16)
        for norm in ("norm1", "norm2"):
            table[p + f"{norm}.weight"] = (16,)
            table[p + f"{norm}.bias"] = (16,)
        table[p + "linear1.weight"] = (16, 16)
        table[p + "linear2.weight"] = (16, 16)
    table["out_norm.weight"] = (16,)
    table["out_norm.bias"] = (16,)
    for j in range(2):
        table[f"depformer_in.{j}.weight"] = (16, 16)
    for c in range(2):
        table[f"depformer_emb.{c}.weight"] = (33, 8)
        table[f"depformer_emb.{c}.low_rank.weight"] = (16, 8)
    table["depformer_text_emb.weight"] = (34, 8)
    table["depformer_text_emb.low_rank.weight"] = (16, 8)
    for i in range(2):
        p = f"depformer.layers.{i}."
        for s in range(2):
            table[p + f"self_attn.out_projs.{s}.weight"] = (16, 16)
            table[p + f"self_attn.in_projs.{s}.weight"] = (48, 16)
        for norm in ("norm1", "norm2"):
            table[p + f"{norm}.weight"] = (16,)
            table[p + f"{norm}.bias"] = (16,)
        for s in range(2):
            table[p + f"gating.{s}.linear_in.weight"] = (20, 16)
            table[p + f"gating.{s}.linear_out.weight"] = (16, 10)
    for c in range(3):
        table[f"linears.{c}.weight"] = (32, 16)
    return table


def test_kyutai_test_configuration_builds_kyutais_module_tree():
    model = LMModel(**KYUTAI_TEST_KWARGS)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == _expected_shapes()
    assert len(model.transformer.layers) == len(model.depformer.layers) == 2
    assert model.depformer.layers[0].self_attn.num_heads == 1


def test_depformer_keys_default_to_the_temporal_transformer_values():
    kwargs = {k: v for k, v in KYUTAI_TEST_KWARGS.items() if k != "depformer_num_heads"}
    kwargs.update(num_heads=2, depformer_dim=32, gating="silu")
    del kwargs["depformer_gating"]
    model = LMModel(**kwargs)
    assert model.depformer.layers[0].self_attn.num_heads == 2
    assert len(model.depformer.layers) == 2
    # The temporal gating reaches the depformer too: a gated FFN per weight set.
    assert tuple(model.depformer.layers[0].gating[0].linear_in.weight.shape) == (2 * (2 * 32 // 3), 32)


def test_kyutai_test_configuration_runs_teacher_forcing():
    torch.manual_seed(0)
    model = LMModel(**KYUTAI_TEST_KWARGS).eval()
    codes = torch.randint(0, 32, (2, 4, 6))
    out = model(codes)
    assert out.logits.shape == (2, 3, 6, 32) and out.text_logits.shape == (2, 1, 6, 33)
