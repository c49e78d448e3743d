"""Streaming generation with a Moshi LM, one 80 ms frame per :meth:`LMGen.step`.

The generator keeps a small ring of recent tokens (``max_delay + 2`` frames) because streams are delayed: the
frame returned by a step mixes tokens sampled at different steps, and the user's audio must be written where the
delayed model input will read it.

The same generator runs Moshi and DSAA models: a DSAA model's text LLM is one more streaming layer of the LM, so
it steps, resets (per batch item) and keeps its bounded KV cache together with the temporal transformer.

Randomness: with ``seed``, batch item ``i`` samples from its own ``torch.Generator`` seeded ``seed + i`` (or
``seed[i]``), so an item's tokens do not depend on the other items: item ``i`` of a batched run is the run of that
item alone with seed ``seed + i``. Resetting an item re-seeds its generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..modules.streaming import State, StreamingModule
from ..utils.cuda_graph import CUDAGraphed, cuda_graphs_enabled
from ..utils.sampling import Generators, sample_token
from .dsaa import is_dsaa
from .lm import UNGENERATED_TOKEN_ID, LMModel


@dataclass
class _LMGenState(State):
    cache: torch.Tensor  # [B, K, max_delay + 2] int64, -2 = not generated yet
    offsets: torch.Tensor  # [B] int64, steps run per item
    initial: torch.Tensor  # [B, K, 1] initial tokens
    seeds: list[int] | None = None  # per item, with their generators
    generators: list[torch.Generator] = field(default_factory=list)
    # The depformer's streaming modules and their states, rewound at every frame rather than rebuilt.
    depformer: list[tuple[StreamingModule, State]] = field(default_factory=list)
    steps: int = 0  # calls since the start or the last reset of every item; no item has run more

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seeds is not None:
            self.generators = [torch.Generator(self.device).manual_seed(s) for s in self.seeds]

    def _clear(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        self.offsets[:] = torch.where(reset_mask, torch.zeros_like(self.offsets), self.offsets)
        self.cache[:] = torch.where(
            reset_mask.view(-1, 1, 1), torch.full_like(self.cache, UNGENERATED_TOKEN_ID), self.cache
        )

    def reset(self, reset_mask: torch.Tensor) -> None:
        self._clear(reset_mask)
        if self.seeds is not None:
            for i in torch.nonzero(reset_mask.cpu()).flatten().tolist():
                self.generators[i].manual_seed(self.seeds[i])
        if bool(reset_mask.all()):
            self.steps = 0

    def reset_all(self) -> None:
        self._clear(torch.ones_like(self.exec_mask))
        for generator, seed in zip(self.generators, self.seeds or []):
            generator.manual_seed(seed)
        self.steps = 0


class LMGen(StreamingModule[_LMGenState]):
    """Frame-by-frame generation (use inside ``with lm_gen.streaming(batch_size):``).

    Args:
        lm_model (LMModel): the model, in eval mode. It is a child of this module, so ``lm_gen.streaming`` also
            streams the temporal transformer; the depformer's streaming state is created with this module's and
            rewound at every frame (the depformer streams over the codebooks of one frame).
        use_sampling (bool): sample (else greedy).
        temp (float), top_k (int): audio sampling.
        temp_text (float), top_k_text (int): text sampling.
        cfg_coef (float): classifier-free guidance; only 1.0 (none): Moshi and DSAA have no condition fuser to
            give the unconditioned logits it mixes in.
        check (bool): raise if an ungenerated token would reach the model.
        condition_tensors: not supported (must be None).
        on_text_hook, on_text_logits_hook, on_audio_hook (Callable | None): called with the text token
            ``[B, 1]``, the text logits ``[B, 1, 1, V]`` and the audio tokens ``[B, dep_q]`` of each step.
        support_out_of_sync, cfg_is_masked_until, cfg_is_no_text: accepted for compatibility; per-item exec masks
            (:meth:`set_exec_mask`) are always honoured.
        generator (torch.Generator | None): RNG for sampling (default: the global one).
        seed (int | Sequence[int] | None): per-item generators, item ``i`` seeded ``seed + i`` (or ``seed[i]``);
            overrides ``generator``.
        cuda_graphs (bool | None): capture the temporal step and the depformer loop as CUDA graphs (default: on
            CUDA unless ``NO_CUDA_GRAPH`` is set). A DSAA temporal step (its LLM cache grows by concatenation)
            and a depformer loop sampling from per-item generators always run eagerly.
    """

    def __init__(
        self,
        lm_model: LMModel,
        use_sampling: bool = True,
        temp: float = 0.8,
        temp_text: float = 0.7,
        top_k: int = 250,
        top_k_text: int = 25,
        cfg_coef: float = 1.0,
        check: bool = False,
        condition_tensors: Any = None,
        on_text_hook: Callable[[torch.Tensor], None] | None = None,
        on_text_logits_hook: Callable[[torch.Tensor], None] | None = None,
        on_audio_hook: Callable[[torch.Tensor], None] | None = None,
        support_out_of_sync: bool = False,
        cfg_is_masked_until: list[int] | None = None,
        cfg_is_no_text: bool = False,
        generator: torch.Generator | None = None,
        seed: int | Sequence[int] | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        super().__init__()
        if lm_model.training:
            raise ValueError("LMGen needs the model in eval mode: call lm_model.eval() first")
        if cfg_coef != 1.0:
            raise ValueError(
                f"cfg_coef={cfg_coef}: classifier-free guidance needs a condition fuser, which Moshi and DSAA "
                "models do not have; use cfg_coef=1.0"
            )
        if condition_tensors is not None:
            raise NotImplementedError("condition_tensors are not supported")
        if lm_model.dep_q == 0:
            raise ValueError("LMGen needs a model with a depformer (dep_q > 0)")
        self.lm_model = lm_model
        self.use_sampling = use_sampling
        self.temp = temp
        self.temp_text = temp_text
        self.top_k = top_k
        self.top_k_text = top_k_text
        self.cfg_coef = cfg_coef
        self.check = check
        self.on_text_hook = on_text_hook
        self.on_text_logits_hook = on_text_logits_hook
        self.on_audio_hook = on_audio_hook
        self.support_out_of_sync = support_out_of_sync
        self.cfg_is_masked_until = cfg_is_masked_until
        self.cfg_is_no_text = cfg_is_no_text
        self.generator = generator
        self.seed = seed
        self.max_delay = max(lm_model.delays)
        self.delays_cuda = torch.tensor(lm_model.delays, dtype=torch.long, device=lm_model.device)
        graphs = cuda_graphs_enabled(lm_model.device) if cuda_graphs is None else cuda_graphs
        self._temporal = CUDAGraphed(lm_model.forward_text, enabled=graphs and not is_dsaa(lm_model))
        self._depformer = CUDAGraphed(
            self._sample_depformer, enabled=graphs and generator is None and seed is None
        )

    def _item_seeds(self, batch_size: int) -> list[int] | None:
        if self.seed is None:
            return None
        if isinstance(self.seed, int):
            return [self.seed + i for i in range(batch_size)]
        seeds = [int(s) for s in self.seed]
        if len(seeds) != batch_size:
            raise ValueError(f"seed has {len(seeds)} values for a batch of {batch_size}")
        return seeds

    def _init_streaming_state(self, batch_size: int) -> _LMGenState:
        lm = self.lm_model
        device = lm.device
        cache = torch.full(
            (batch_size, lm.num_codebooks, self.max_delay + 2), UNGENERATED_TOKEN_ID, dtype=torch.long, device=device
        )
        offsets = torch.zeros(batch_size, dtype=torch.long, device=device)
        initial = lm.initial_tokens(device).expand(batch_size, -1, -1)
        depformer = [(module, module._init_streaming_state(batch_size)) for _, module in lm.depformer._streaming_modules()]
        # Captured graphs point at the previous state's buffers.
        self._temporal.reset()
        self._depformer.reset()
        return _LMGenState(
            batch_size, device, cache=cache, offsets=offsets, initial=initial, seeds=self._item_seeds(batch_size),
            depformer=depformer,
        )

    def _generators(self) -> Generators:
        state = self._streaming_state
        if state is not None and state.seeds is not None:
            return state.generators
        return self.generator

    def _sample(self, logits: torch.Tensor, temp: float, top_k: int) -> torch.Tensor:
        return sample_token(logits.float(), self.use_sampling, temp, top_k, generator=self._generators())

    @torch.no_grad()
    def depformer_step(self, text_token: torch.Tensor, transformer_out: torch.Tensor) -> torch.Tensor:
        """Samples the ``dep_q`` audio tokens of one frame: ``[B, 1, 1]`` text, ``[B, 1, dim]`` → ``[B, dep_q, 1]``."""
        return self._depformer(text_token, transformer_out)

    def _sample_depformer(self, text_token: torch.Tensor, transformer_out: torch.Tensor) -> torch.Tensor:
        lm = self.lm_model
        B = text_token.shape[0]
        state = self._streaming_state
        if state is None:
            raise RuntimeError("LMGen.depformer_step must run inside `with lm_gen.streaming(batch_size):`")
        # The states are installed only for this frame, so the depformer is never left streaming; rewinding them
        # reads nothing back from the device, so a captured graph replays it too.
        for module, module_state in state.depformer:
            module_state.reset_all()
            module._streaming_state = module_state
        previous = text_token
        tokens = []
        try:
            for c in range(lm.dep_q):
                logits = lm.forward_depformer(c, previous, transformer_out)
                previous = self._sample(logits, self.temp, self.top_k)  # [B, 1, 1]
                tokens.append(previous[:, 0])
        finally:
            for module, _ in state.depformer:
                module._streaming_state = None
        return torch.stack(tokens, dim=1).view(B, lm.dep_q, 1)

    @torch.no_grad()
    def _step(
        self, input_tokens: torch.Tensor, depformer_replace_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        state = self._streaming_state
        if state is None:
            raise RuntimeError("LMGen.step must run inside `with lm_gen.streaming(batch_size):`")
        lm = self.lm_model
        B, Ki, S = input_tokens.shape
        n_user = lm.n_q - lm.dep_q
        if B != state.batch_size or S != 1 or Ki < n_user:
            raise ValueError(
                f"input_tokens must be [B={state.batch_size}, >= {n_user}, 1] user codes, got {tuple(input_tokens.shape)}"
            )
        input_tokens = input_tokens[:, :n_user].to(state.cache.device)
        cache, offsets, exec_mask = state.cache, state.offsets, state.exec_mask
        CT = cache.shape[2]
        delays = self.delays_cuda
        first_user = 1 + lm.dep_q

        # 1. the user's tokens go where the delayed input will read them.
        user_cache = cache[:, first_user:]
        slots = ((offsets.view(B, 1) + delays[first_user:].view(1, -1)) % CT).unsqueeze(-1)  # [B, n_user, 1]
        old = user_cache.gather(2, slots)
        user_cache.scatter_(2, slots, torch.where(exec_mask.view(B, 1, 1), input_tokens, old))

        # 2. model input: this step's slot, or the initial token while a stream's delay has not elapsed.
        read = (offsets % CT).view(B, 1, 1).expand(B, lm.num_codebooks, 1)
        model_input = cache.gather(2, read)
        is_initial = (offsets.view(B, 1) <= delays.view(1, -1)).unsqueeze(-1)
        model_input = torch.where(is_initial, state.initial, model_input)
        if self.check and bool(((model_input == UNGENERATED_TOKEN_ID) & exec_mask.view(B, 1, 1)).any()):
            raise RuntimeError(f"ungenerated tokens reached the model at offsets {offsets.tolist()}")

        # 3-4. text, then the depformer's audio tokens.
        transformer_out, text_logits = self._temporal(model_input)
        if self.on_text_logits_hook is not None:
            self.on_text_logits_hook(text_logits)
        text_token = self._sample(text_logits, self.temp_text, self.top_k_text)  # [B, 1, 1]
        if self.on_text_hook is not None:
            self.on_text_hook(text_token[:, 0])
        if depformer_replace_tokens is None:
            audio_tokens = self.depformer_step(text_token, transformer_out)
        else:
            if depformer_replace_tokens.shape != (B, lm.dep_q, 1):
                raise ValueError(
                    f"depformer_replace_tokens must be [{B}, {lm.dep_q}, 1], got {tuple(depformer_replace_tokens.shape)}"
                )
            audio_tokens = depformer_replace_tokens.to(cache.device)
        if self.on_audio_hook is not None:
            self.on_audio_hook(audio_tokens[:, :, 0])

        # 5. advance and store the sampled tokens.
        offsets += exec_mask.long()
        generated = torch.cat([text_token, audio_tokens], dim=1)  # [B, 1 + dep_q, 1]
        own_cache = cache[:, :first_user]
        write = (offsets % CT).view(B, 1, 1).expand(B, first_user, 1)
        old = own_cache.gather(2, write)
        own_cache.scatter_(2, write, torch.where(exec_mask.view(B, 1, 1), generated, old))

        # 6-7. the un-delayed frame, once a stream may have caught up. No item has run more steps than the
        # generator (``state.steps``), so the first ``max_delay`` steps are known to have none, without asking
        # the device; after that, items not caught up yet (reset or skipped by the exec mask) get -2.
        state.steps += 1
        if state.steps <= self.max_delay:
            return None, transformer_out
        ready = offsets > self.max_delay
        out_slots = ((offsets.view(B, 1) - self.max_delay + delays[:first_user].view(1, -1)) % CT).unsqueeze(-1)
        out = own_cache.gather(2, out_slots)
        valid = (ready & exec_mask).view(B, 1, 1)
        out = torch.where(valid, out, torch.full_like(out, UNGENERATED_TOKEN_ID))
        return out, transformer_out

    def step(
        self, input_tokens: torch.Tensor, depformer_replace_tokens: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Runs one frame.

        Args:
            input_tokens (torch.Tensor): the user's audio codes for this frame ``[B, >= n_q - dep_q, 1]`` (extra
                codebooks are dropped).
            depformer_replace_tokens (torch.Tensor | None): ``[B, dep_q, 1]`` audio tokens to use instead of
                sampling them.

        Returns:
            ``None`` during the first ``max_delay`` steps (since streaming started or every item was reset), then
            int64 ``[B, 1 + dep_q, 1]``: the text token and the ``dep_q`` audio tokens of one (un-delayed) frame;
            ``-2`` for items not ready (reset or skipped by the exec mask since) or not executed.
        """
        out, _ = self._step(input_tokens, depformer_replace_tokens)
        return out

    def step_with_extra_heads(
        self, input_tokens: torch.Tensor, depformer_replace_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """:meth:`step` plus ``softmax(head(transformer_out))`` for every extra head."""
        out, transformer_out = self._step(input_tokens, depformer_replace_tokens)
        if out is None:
            return None
        heads = [torch.softmax(head(transformer_out), dim=-1) for head in self.lm_model.extra_heads]
        return out, heads
