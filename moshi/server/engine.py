"""One batched generator shared by every conversation: batch item ``i`` is slot ``i``.

All model work happens in :meth:`BatchEngine.step`, called from one thread, one 80 ms frame per call. A slot
that joins is reset (Mimi and LM state, its RNG, its sampling settings) at the start of the next step, so the
other slots never see it. A slot with no input in a step is paused through the streaming exec mask: its state
does not move and it produces nothing, so each conversation advances only on its own input. Models whose
streaming cannot pause one batch item (the probe in :meth:`BatchEngine.warm_up` finds out) are fed silence in
those slots instead; the caller then gets output for every occupied slot at every step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..models.compression import MimiModel
from ..models.lm_gen import LMGen
from ..utils.sampling import sample_token

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling of one conversation; a seed of None draws a fresh one when the slot starts."""

    temp: float = 0.8
    top_k: int = 250
    temp_text: float = 0.7
    top_k_text: int = 25
    audio_seed: int | None = None
    text_seed: int | None = None


class SlotLMGen(LMGen):
    """:class:`LMGen` whose sampling settings and RNG streams are per batch item.

    A plain :class:`LMGen` samples the whole batch with one temperature and top-k; the server's conversations
    each bring their own settings and seeds, so every row is sampled on its own. Items not executed in a step
    take the argmax, so a paused conversation's RNG streams do not move.
    """

    def __init__(self, lm_model: Any, batch_size: int, use_sampling: bool = True, **kwargs: Any) -> None:
        super().__init__(lm_model, use_sampling=use_sampling, **kwargs)
        defaults = SamplingSettings(self.temp, self.top_k, self.temp_text, self.top_k_text)
        self.settings = [defaults] * batch_size
        device = lm_model.device
        self.text_generators = [torch.Generator(device=device) for _ in range(batch_size)]
        self.audio_generators = [torch.Generator(device=device) for _ in range(batch_size)]
        self._sampling_audio = False

    def configure_slot(self, slot: int, settings: SamplingSettings) -> None:
        """Sets the settings of ``slot`` and seeds its two RNG streams (fresh seeds where None)."""
        self.settings[slot] = settings
        for generator, seed in (
            (self.text_generators[slot], settings.text_seed),
            (self.audio_generators[slot], settings.audio_seed),
        ):
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)

    def depformer_step(self, text_token: torch.Tensor, transformer_out: torch.Tensor) -> torch.Tensor:
        # Eager on purpose: per-item settings are read on the host, which a captured CUDA graph cannot do.
        self._sampling_audio = True
        try:
            return self._sample_depformer(text_token, transformer_out)
        finally:
            self._sampling_audio = False

    def _sample(self, logits: torch.Tensor, temp: float, top_k: int) -> torch.Tensor:
        state = self._streaming_state
        executed = state.exec_mask.tolist() if state is not None else [True] * logits.shape[0]
        tokens = []
        for b, run in enumerate(executed):
            row = logits[b : b + 1].float()
            s = self.settings[b]
            if self._sampling_audio:
                t, k, generator = s.temp, s.top_k, self.audio_generators[b]
            else:
                t, k, generator = s.temp_text, s.top_k_text, self.text_generators[b]
            if not run:
                t = 0.0  # argmax: no RNG draw for a paused item
            tokens.append(sample_token(row, self.use_sampling, t, k, generator=generator))
        return torch.cat(tokens, dim=0)


@dataclass
class SlotOutput:
    """What one slot produced in one step: 1920 samples of audio and the text token id."""

    pcm: np.ndarray
    text_id: int


class BatchEngine:
    """Mimi + :class:`SlotLMGen` streaming over ``slots`` conversations.

    Args:
        lm_gen (SlotLMGen): generator with batch size ``slots`` (not yet streaming).
        mimi (MimiModel): the codec, ``num_codebooks`` set for the LM, in eval mode.
        slots (int): batch size = the most conversations served at once.
    """

    def __init__(self, lm_gen: SlotLMGen, mimi: MimiModel, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.lm_gen = lm_gen
        self.mimi = mimi
        self.slots = slots
        self.frame_size = int(mimi.frame_size)
        self.sample_rate = int(mimi.sample_rate)
        self.device = lm_gen.lm_model.device
        self.can_pause = True
        self._dep_q = lm_gen.lm_model.dep_q
        self._skip_text = {lm_gen.lm_model.text_padding_token_id, lm_gen.lm_model.end_of_text_padding_id}
        self._encoder_parts = [m for m in (mimi.encoder, mimi.encoder_transformer, mimi.downsample) if m is not None]
        self._decoder_parts = [m for m in (mimi.upsample, mimi.decoder_transformer, mimi.decoder) if m is not None]
        self._streaming = ExitStack()
        self._streaming.enter_context(lm_gen.streaming(slots))
        self._streaming.enter_context(mimi.streaming(slots))

    def close(self) -> None:
        """Ends streaming, so the models can serve another engine."""
        self._streaming.close()

    def is_silent_text(self, text_id: int) -> bool:
        """PAD and end-of-padding ids carry no text for the transcript."""
        return text_id in self._skip_text

    def _mask(self, slots: list[int] | set[int]) -> torch.Tensor:
        mask = torch.zeros(self.slots, dtype=torch.bool, device=self.device)
        if slots:
            mask[list(slots)] = True
        return mask

    def _set_mask(self, parts: list[Any], mask: torch.Tensor) -> None:
        for part in parts:
            part.set_exec_mask(mask)

    @torch.no_grad()
    def warm_up(self, frames: int = 4) -> None:
        """Runs silent frames through every slot, probes per-slot pausing, then resets every slot."""
        for _ in range(frames):
            self.step({slot: np.zeros(self.frame_size, np.float32) for slot in range(self.slots)})
        if self.slots > 1:
            try:
                self.step({0: np.zeros(self.frame_size, np.float32)})
            except NotImplementedError as exc:
                self.can_pause = False
                logger.info("this model cannot pause one conversation (%s): idle slots are fed silence", exc)
        self.lm_gen.reset_streaming()
        self.mimi.reset_streaming()
        self._set_mask(self._encoder_parts + self._decoder_parts + [self.lm_gen], self._mask(range(self.slots)))

    @torch.no_grad()
    def step(
        self,
        frames: Mapping[int, np.ndarray],
        joins: Mapping[int, SamplingSettings] | None = None,
    ) -> dict[int, SlotOutput]:
        """Runs one frame for the slots in ``frames`` (slot -> 1920 float32 samples).

        ``joins`` lists the slots whose conversation starts now: they are reset before the frame runs. Returns
        the output of each slot that produced a frame (a slot's first frame after a reset produces none).
        Without pausing support every slot runs and slots missing from ``frames`` get silence.
        """
        if joins:
            reset = self._mask(set(joins))
            self.lm_gen.reset_streaming(reset)
            self.mimi.reset_streaming(reset)
            for slot, settings in joins.items():
                self.lm_gen.configure_slot(slot, settings)
        executed = set(frames) if self.can_pause else set(range(self.slots))
        if not executed:
            return {}
        pcm = torch.zeros(self.slots, 1, self.frame_size, dtype=torch.float32)
        for slot, samples in frames.items():
            pcm[slot, 0] = torch.from_numpy(np.asarray(samples, dtype=np.float32))
        run = self._mask(executed)
        self._set_mask(self._encoder_parts + [self.lm_gen], run)
        codes = self.mimi.encode(pcm.to(self.device))
        out = self.lm_gen.step(codes)
        if out is None:
            return {}
        audio_codes = out[:, 1 : 1 + self._dep_q]
        valid = (audio_codes >= 0).all(dim=1).view(-1) & run
        ready = [slot for slot in range(self.slots) if bool(valid[slot])]
        if not ready:
            return {}
        self._set_mask(self._decoder_parts, valid)
        decoded = self.mimi.decode(audio_codes.clamp_min(0))[:, 0].float().cpu().numpy()
        text_ids = out[:, 0, 0].tolist()
        return {slot: SlotOutput(decoded[slot], int(text_ids[slot])) for slot in ready}


def timed_step(
    engine: BatchEngine, frames: Mapping[int, np.ndarray], joins: Mapping[int, SamplingSettings]
) -> tuple[dict[int, SlotOutput], float]:
    """:meth:`BatchEngine.step` and its wall time in ms (synchronised with the device)."""
    start = time.perf_counter()
    result = engine.step(frames, joins)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return result, (time.perf_counter() - start) * 1000.0
