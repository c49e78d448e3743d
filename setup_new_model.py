"""Builds a DSAA checkpoint from a Moshi (or fork / DSAA) checkpoint and a Hugging Face LLM.

Usage::

    torchrun --nproc-per-node 1 -m setup_new_model CONFIG [--out weights/] [--force] [--keep-adapters]
    python -m setup_new_model CONFIG [...]

It reads ``moshi_paths``, ``text_llm``, ``seed`` and ``param_dtype`` from the training YAML, reuses the Moshi
tensors of ``moshi_paths`` by name (after checking shapes), drops Moshi's text modules, loads the LLM from
``text_llm.hf_repo_id``, initialises every DSAA module as ``docs/dsaa.md`` describes (on CPU in float32,
seeded, so two runs write identical bytes), casts to ``param_dtype`` and writes ``--out`` (``model.safetensors``,
``config.json``, ``tokenizer/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moshi.models.dsaa import (
    DSAA_MODULES,
    REMOVED_MOSHI_MODULES,
    dsaa_dims,
    dsaa_param_group_prefixes,
    initialize_dsaa_modules,
)
from moshi.models.dsaa_loading import (
    DSAABlock,
    TextLLMSpec,
    build_dsaa_model,
    classify_state,
    find_weights,
    load_llm,
    load_llm_tokenizer,
    save_dsaa_checkpoint,
)
from moshi.models.dsaa_tokens import SpecialTokens, resolve_special_tokens
from moshi.models.lm import LMModel
from moshi.models.loaders import _NON_LM_CONFIG_KEYS, MOSHI_NAME, _config_file, default_lm_kwargs, hf_get
from moshi.utils.dtypes import DTYPES

logger = logging.getLogger("setup_new_model")

@dataclass
class MoshiSource:
    """The checkpoint named by ``moshi_paths``: its tensors, Moshi kwargs and (for DSAA sources) ``dsaa`` block."""

    weights: Path
    state: dict[str, torch.Tensor]
    lm_kwargs: dict[str, Any]
    kind: str  # "moshi" | "dsaa"
    block: DSAABlock | None


def read_moshi_source(paths: Any) -> MoshiSource:
    """Resolves ``moshi_paths``; the Moshi config comes from ``config_path``, else a ``config.json`` beside the
    weights, else ``hf_repo_id``'s, else moshiko's defaults."""
    from safetensors.torch import load_file

    if paths.moshi_path:
        weights = hf_get(paths.moshi_path)
    elif paths.hf_repo_id:
        weights = hf_get(MOSHI_NAME, paths.hf_repo_id)
    else:
        raise ValueError("moshi_paths: set moshi_path (or hf_repo_id) to the source checkpoint")
    if not Path(weights).exists():
        raise FileNotFoundError(f"moshi_paths.moshi_path: {weights} not found")
    weights, beside = find_weights(weights)
    if paths.config_path:
        config_file: Path | None = hf_get(paths.config_path)
    elif beside is not None:
        config_file = beside
    elif paths.hf_repo_id:
        config_file = _config_file(paths.hf_repo_id, None)
    else:
        config_file = None
    raw: dict[str, Any] = {}
    if config_file is None:
        logger.warning("no Moshi config.json for %s: using the moshiko-7B defaults", weights)
        lm_kwargs = default_lm_kwargs()
    else:
        raw = json.loads(Path(config_file).read_text(encoding="utf-8"))
        lm_kwargs = {k: v for k, v in raw.items() if k != "dsaa" and k not in _NON_LM_CONFIG_KEYS}
    state = load_file(str(weights))
    kind = classify_state(state, weights)
    block = DSAABlock.from_dict(raw["dsaa"], Path(config_file)) if "dsaa" in raw else None
    return MoshiSource(weights, state, lm_kwargs, kind, block)


def _top_level(key: str) -> str:
    return key.split(".", 1)[0]


def assemble(
    source: MoshiSource,
    spec: TextLLMSpec,
    seed: int,
    keep_adapters: bool = False,
) -> tuple[LMModel, Any, SpecialTokens, dict[str, str]]:
    """Builds the DSAA model in float32 on CPU. Returns ``(model, tokenizer, special tokens, origin per module)``."""
    llm = load_llm(spec, dtype=torch.float32)
    tokenizer = load_llm_tokenizer(spec)
    special = resolve_special_tokens(tokenizer, spec.pad_token, spec.epad_token, spec.bos_token)
    with torch.device("meta"):
        model = build_dsaa_model(
            source.lm_kwargs, llm, special, proj_hidden=spec.proj_hidden, proj_dropout=spec.proj_dropout
        )
    origin: dict[str, str] = {}
    dsaa_names = set(DSAA_MODULES)
    moshi_state = {
        k: v.to(torch.float32)
        for k, v in source.state.items()
        if _top_level(k) not in dsaa_names | set(REMOVED_MOSHI_MODULES) and _top_level(k) != "text_llm"
    }
    try:
        result = model.load_state_dict(moshi_state, strict=False, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{source.weights}: Moshi tensors do not match moshi_paths' config: {e}") from None
    missing_moshi = [
        k for k in result.missing_keys if _top_level(k) not in dsaa_names and _top_level(k) != "text_llm"
    ]
    if missing_moshi or result.unexpected_keys:
        raise ValueError(
            f"{source.weights} does not match the Moshi config: missing tensors {missing_moshi[:20]}, "
            f"unexpected tensors {result.unexpected_keys[:20]}"
        )
    for name, _ in model.named_children():
        if name not in dsaa_names and name != "text_llm":
            origin[name] = f"source {source.weights.name}"
    origin["text_llm"] = f"LLM {spec.hf_repo_id}"
    for name in REMOVED_MOSHI_MODULES:
        # Moshi's depformer_text_emb is a bare table (``.weight``); DSAA's has the same name (``.emb.weight``).
        if any(_top_level(k) == name and k != "depformer_text_emb.emb.weight" for k in source.state):
            origin[f"dropped:{name}"] = "dropped"

    kept = _reusable_adapters(model, source, spec) if keep_adapters else []
    initialize_dsaa_modules(model, seed, [m for m in DSAA_MODULES if m not in kept], warn=logger.warning)
    if kept:  # still on meta from the build: assign the source tensors (presence and shapes checked above)
        kept_state = {k: v.to(torch.float32) for k, v in source.state.items() if _top_level(k) in kept}
        model.load_state_dict(kept_state, strict=False, assign=True)
    for name in DSAA_MODULES:
        if name in kept:
            origin[name] = f"kept from {source.weights.name} (--keep-adapters)"
        elif name in ("text_head", "depformer_text_emb"):
            origin[name] = "copied from the LLM"
        elif name == "depformer_text_proj":
            origin[name] = "PCA of the LLM input embedding"
        else:
            origin[name] = "initialised"
    meta = [k for k, v in model.state_dict().items() if v.is_meta]
    if meta:
        raise RuntimeError(f"tensors left uninitialised: {meta[:20]}")
    return model.eval(), tokenizer, special, origin


def _reusable_adapters(model: LMModel, source: MoshiSource, spec: TextLLMSpec) -> list[str]:
    """DSAA modules whose source tensors can be kept: same LLM (repo and revision when the source says) and
    every tensor of the module present with the same shape."""
    if source.kind != "dsaa":
        return []
    if source.block is not None and (source.block.hf_repo_id, source.block.revision) != (
        spec.hf_repo_id,
        spec.revision,
    ):
        logger.warning(
            "--keep-adapters: the source was set up for %s, not %s; re-initialising every DSAA module",
            source.block.hf_repo_id,
            spec.hf_repo_id,
        )
        return []
    expected = model.state_dict()
    kept = []
    for name in DSAA_MODULES:
        keys = [k for k in expected if _top_level(k) == name]
        if all(k in source.state and tuple(source.state[k].shape) == tuple(expected[k].shape) for k in keys):
            kept.append(name)
    return kept


def summary(model: LMModel, special: SpecialTokens, origin: dict[str, str]) -> str:
    """Dims, special tokens and one row per module: origin, parameter count, trainable or frozen."""
    d = dsaa_dims(model)
    lines = [
        f"dims: D_m={d.dim} D_d={d.depformer_dim} D_l={d.text_dim} V_in={d.text_in_vocab} V={d.text_vocab} "
        f"H={d.proj_hidden} P={d.num_projectors} n_q={d.n_q} dep_q={d.dep_q} card={d.card}",
        f"special tokens: PAD={special.pad_id} {special.pad_str!r}  EPAD={special.epad_id} {special.epad_str!r}  "
        f"BOS={special.bos_id} {special.bos_str!r}",
    ]
    groups = dsaa_param_group_prefixes(model)
    group_of = {name: group for group, names in groups.items() for name in names}
    rows = [("module", "origin", "params", "default group")]
    for name, module in model.named_children():
        params = sum(p.numel() for p in module.parameters())
        if params == 0:
            continue
        group = group_of.get(name, "frozen")
        rows.append(
            (
                name,
                origin.get(name, "?"),
                f"{params:,}",
                "frozen" if group == "frozen" else f"trainable ({group})",
            )
        )
    for name in REMOVED_MOSHI_MODULES:
        if f"dropped:{name}" in origin:
            rows.append((f"{name} (Moshi's)" if name in DSAA_MODULES else name, "dropped", "-", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(
                cell.ljust(w) if j != 2 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))
            )
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    total = sum(p.numel() for p in model.parameters())
    lines.append(f"total parameters: {total:,}")
    return "\n".join(lines)


def run(
    config: str | Path,
    out: str | Path = "weights",
    force: bool = False,
    keep_adapters: bool = False,
    source: str | None = None,
) -> Path:
    """Reads ``config``, builds the DSAA model and writes ``out``; returns ``out``.

    ``source`` overrides ``moshi_paths.moshi_path`` as the checkpoint to start from: a path,
    or ``"repo"`` for the plain Moshi of ``moshi_paths.hf_repo_id``. It lets one YAML serve both
    steps, its ``moshi_path`` naming the DSAA checkpoint that this command writes for training.
    """
    from finetune.args import TrainArgs

    args = TrainArgs.load(config, validate=False)
    if source is not None:
        args.moshi_paths = dataclasses.replace(args.moshi_paths, moshi_path=None if source == "repo" else source)
    if not args.text_llm.enable:
        raise ValueError(f"{config}: text_llm.enable must be true to set up a DSAA model")
    if args.param_dtype not in DTYPES:
        raise ValueError(f"{config}: param_dtype must be one of {list(DTYPES)}, got {args.param_dtype!r}")
    out = Path(out)
    if not force and any((out / n).exists() for n in ("model.safetensors", "config.json", "tokenizer")):
        raise FileExistsError(f"{out} already holds a checkpoint; pass --force to overwrite it")
    spec = TextLLMSpec.from_args(args.text_llm)
    source = read_moshi_source(args.moshi_paths)
    logger.info("source: %s (%s checkpoint, %d tensors)", source.weights, source.kind, len(source.state))
    model, tokenizer, special, origin = assemble(source, spec, args.seed, keep_adapters=keep_adapters)
    print(summary(model, special, origin), flush=True)
    save_dsaa_checkpoint(
        model,
        out,
        tokenizer,
        hf_repo_id=spec.hf_repo_id,
        revision=spec.revision,
        save_weights=spec.save_weights,
        overwrite=force,
        dtype=DTYPES[args.param_dtype],
    )
    print(f"wrote {out / 'model.safetensors'}, {out / 'config.json'} and {out / 'tokenizer'}/", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="setup_new_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="training YAML with moshi_paths and text_llm (enable: true)")
    parser.add_argument("--out", default="weights", help="checkpoint folder to write (default: weights/)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in --out")
    parser.add_argument(
        "--keep-adapters",
        action="store_true",
        help="reuse the source's DSAA tensors whose shapes match when the LLM is the same",
    )
    parser.add_argument(
        "--source",
        default=None,
        help="checkpoint to start from instead of moshi_paths.moshi_path: a path (Moshi, fork or DSAA), "
        "or 'repo' for the plain Moshi of moshi_paths.hf_repo_id",
    )
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        with torch.no_grad():
            run(ns.config, ns.out, force=ns.force, keep_adapters=ns.keep_adapters, source=ns.source)
    except (FileExistsError, FileNotFoundError, ValueError) as e:  # user errors: the message names the key
        print(f"setup_new_model: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
