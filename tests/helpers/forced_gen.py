"""Teacher-forced streaming generation: stepping ``LMGen`` on known codes and comparing with the one-shot forward."""

from __future__ import annotations

import torch

from moshi.models.lm import LMModel, delay_codes
from moshi.models.lm_gen import LMGen


class ForcedGen(LMGen):
    """Feeds teacher tokens instead of sampling and records every logits tensor it would sample from."""

    def __init__(self, model: LMModel, delayed: torch.Tensor) -> None:
        super().__init__(model, use_sampling=False)
        self.delayed = delayed
        self.step_index = 0
        self.calls = 0
        self.recorded: list[torch.Tensor] = []

    def _sample(self, logits, temp, top_k):
        row = self.calls % (1 + self.lm_model.dep_q)
        self.calls += 1
        self.recorded.append(logits.reshape(logits.shape[0], -1))
        column = self.step_index + 1
        if column >= self.delayed.shape[2]:
            return torch.zeros(logits.shape[0], 1, 1, dtype=torch.long)
        return self.delayed[:, row, column].view(-1, 1, 1)


def check_stepping_matches_forward(model: LMModel, codes: torch.Tensor, rounds: int = 2, tol: float = 1e-4) -> None:
    """Steps ``model`` on ``codes [B, K, T]`` (teacher tokens in place of samples) and checks, at every step past
    the delays, the text and depformer logits against ``model(codes)``, and the returned frames against the codes;
    again after ``reset_streaming()`` when ``rounds > 1``.

    ``tol``: float32 logits of tiny models computed in a different order (a cache and one query per step instead
    of one masked pass); their error is ~1e-6, far below 1e-4.
    """
    with torch.no_grad():
        out = model(codes)
    T = codes.shape[2]
    # One extra (repeated) frame so that the tokens of delayed streams sampled at the last step exist.
    delayed = delay_codes(torch.cat([codes, codes[..., -1:]], dim=2), model.delays, model.initial_tokens())
    gen = ForcedGen(model, delayed)
    dq, steps = model.dep_q, T + model.max_delay
    first_user = 1 + dq
    B = codes.shape[0]
    with gen.streaming(B):
        for _ in range(rounds):
            gen.calls, gen.recorded = 0, []
            frames = []
            for s in range(steps):
                gen.step_index = s
                user = codes[:, first_user:, max(s - 1, 0)].unsqueeze(-1)
                frames.append(gen.step(user))
            assert len(gen.recorded) == steps * (1 + dq)

            def rec(step: int, row: int) -> torch.Tensor:
                return gen.recorded[step * (1 + dq) + row]

            for s in range(T):
                torch.testing.assert_close(rec(s, 0), out.text_logits[:, 0, s], rtol=tol, atol=tol)
            for c in range(dq):
                delay = model.delays[1 + c]
                for s in range(delay, T):  # later frames have no teacher-forced prediction (NaN)
                    torch.testing.assert_close(rec(s, 1 + c), out.logits[:, c, s - delay], rtol=tol, atol=tol)
            assert all(f is None for f in frames[: model.max_delay])
            assert torch.equal(torch.cat(frames[model.max_delay :], dim=2), codes[:, :first_user])
            gen.reset_streaming()
