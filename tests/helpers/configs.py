"""Small model configurations shared by the tests."""

from __future__ import annotations

from typing import Any

# Same structure as moshiko-7B (rope, rms_norm_f32, silu gating, per-step depformer weights),
# tiny sizes. 45 tensors, 182,720 parameters.
SMALL_LM_KWARGS: dict[str, Any] = {
    "dim": 64,
    "text_card": 100,
    "existing_text_padding_id": 3,
    "n_q": 4,
    "dep_q": 2,
    "card": 32,
    "num_heads": 4,
    "num_layers": 2,
    "hidden_scale": 4.125,
    "causal": True,
    "layer_scale": None,
    "context": 10,
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 32,
    "depformer_dim_feedforward": 132,
    "depformer_num_heads": 2,
    "depformer_num_layers": 2,
    "depformer_layer_scale": None,
    "depformer_multi_linear": True,
    "depformer_context": 2,
    "depformer_max_period": 10000,
    "depformer_gating": "silu",
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 0, 1],
}


def small_lm_kwargs(**overrides: Any) -> dict[str, Any]:
    """A fresh copy of :data:`SMALL_LM_KWARGS` with ``overrides`` applied (tests may mutate it)."""
    kwargs = {k: (list(v) if isinstance(v, list) else v) for k, v in SMALL_LM_KWARGS.items()}
    kwargs.update(overrides)
    return kwargs
