"""LoRA as module replacement: names, merge equivalence, LoRA-only round trip."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moshi.models import loaders
from moshi.models.lm import LMModel
from moshi.modules.lora import (
    LoRALinear,
    init_lora_for_training,
    lora_state_dict,
    replace_all_linear_with_lora,
    replace_lora_with_linear,
)
from tests.helpers.fill import fill_state_dict
from tests.helpers.models import filled_small_lm, fixture_codes


def _perturb_lora(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _logits(model: LMModel) -> torch.Tensor:
    with torch.no_grad():
        out = model(fixture_codes())
    return torch.cat([out.text_logits.flatten(), out.logits.nan_to_num().flatten()])


def test_lora_linear_computes_frozen_plus_scaled_low_rank_and_orders_keys():
    layer = LoRALinear(6, 5, rank=2, scaling=2.0, dtype=torch.float32)
    assert list(layer.state_dict()) == ["lora_A.weight", "lora_B.weight", "frozen_W.weight"]
    x = torch.randn(3, 6)
    expected = x @ layer.frozen_W.weight.T + 2.0 * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.merge_weight(), layer.frozen_W.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight)


def test_plain_linear_checkpoint_loads_into_frozen_w():
    base = nn.Linear(4, 3, bias=False)
    layer = LoRALinear(4, 3, rank=2, scaling=1.0, dtype=torch.float32)
    result = layer.load_state_dict(base.state_dict(), strict=False)
    assert torch.equal(layer.frozen_W.weight, base.weight)
    assert sorted(result.missing_keys) == ["lora_A.weight", "lora_B.weight"] and not result.unexpected_keys


def test_replace_hits_every_linear_and_keeps_the_original_as_frozen_w():
    model = filled_small_lm()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    replace_all_linear_with_lora(model, rank=4, scaling=2.0)
    loras = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert set(loras) == set(linears)
    assert all(loras[name].frozen_W is linears[name] for name in linears)
    assert "transformer.layers.0.self_attn.in_projs.0.lora_A.weight" in model.state_dict()
    assert model.state_dict()["depformer.layers.1.gating.1.linear_in.lora_B.weight"].shape == (176, 4)


def test_lora_model_equals_its_fused_copy():
    model = filled_small_lm()
    replace_all_linear_with_lora(model, rank=4, scaling=2.0)
    _perturb_lora(model)
    lora_logits = _logits(model)
    replace_lora_with_linear(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert list(model.state_dict()) == list(filled_small_lm().state_dict())
    torch.testing.assert_close(_logits(model), lora_logits, atol=5e-4, rtol=1e-4)
    assert not torch.allclose(_logits(filled_small_lm()), lora_logits, atol=1e-3)


def test_training_init_starts_from_the_base_model():
    model = filled_small_lm()
    replace_all_linear_with_lora(model, rank=4, scaling=2.0)
    init_lora_for_training(model)
    layer = model.text_linear
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1.0 / math.sqrt(layer.in_features)  # kaiming-uniform a=sqrt(5) bound
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.5 * bound
    torch.testing.assert_close(_logits(model), _logits(filled_small_lm()))


def test_lora_only_file_reproduces_the_model_on_a_fresh_base(tmp_path):
    model = filled_small_lm()
    replace_all_linear_with_lora(model, rank=4, scaling=2.0)
    _perturb_lora(model)
    tensors = lora_state_dict(model)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert len(tensors) == 2 * sum(isinstance(m, LoRALinear) for m in model.modules())
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "lora.safetensors")

    fresh = filled_small_lm()
    replace_all_linear_with_lora(fresh, rank=4, scaling=2.0)
    result = fresh.load_state_dict(load_file(tmp_path / "lora.safetensors"), strict=False)
    assert not result.unexpected_keys and not any("lora" in k for k in result.missing_keys)
    torch.testing.assert_close(_logits(fresh), _logits(model))


def test_moshiko_lora_rank_128_counts():
    model = LMModel(**loaders.DEFAULT_LM_KWARGS, device="meta", dtype=torch.bfloat16)
    replace_all_linear_with_lora(model, rank=128, scaling=2.0)
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(loras) == 337
    assert sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in loras) == 387_874_816
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["transformer.layers.0.self_attn.in_projs.0.lora_A.weight"] == (128, 4096)
    assert shapes["transformer.layers.0.self_attn.in_projs.0.lora_B.weight"] == (12288, 128)
    assert loras[0].lora_A.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_weight_dtype_follows_the_base(dtype):
    model = filled_small_lm(dtype=dtype)
    replace_all_linear_with_lora(model, rank=2, scaling=1.0)
    replace_lora_with_linear(model)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_fill_is_deterministic():
    a, b = filled_small_lm(), filled_small_lm()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert fill_state_dict(a).keys() == a.state_dict().keys()
