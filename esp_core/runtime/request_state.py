"""What an instance remembers about a request between plans: its tokens and sampling params.

Prompt ids arrive once (in `IterationPlan.new_requests`); output tokens arrive as decode
`input_token`s, `DecodeItem.output_prefix` and `PrefillItem.extra_token_ids`, or, for a
look-ahead step (`input_token=None`), are the token this instance sampled last. Every
instance of a batch records them, so whichever instance samples next has the full
history for penalties (masters may change every step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from esp_core.sched.plan import NewRequest, SamplingParams


@dataclass
class RequestState:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    output_ids: list[int] = field(default_factory=list)  # outputs known so far, in order
    # (position, token) this instance sampled as the master of a one-instance decode
    # step: the input of a look-ahead step (DecodeItem.input_token=None) at that position
    sampled: tuple[int, int] | None = None

    @classmethod
    def from_new(cls, req: NewRequest) -> RequestState:
        return cls(req.request_id, tuple(req.prompt_token_ids), req.sampling)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    def record_token(self, position: int, token_id: int) -> None:
        """Record the token at global `position` (a prompt position is checked, not stored)."""
        if position < self.prompt_len:
            if self.prompt_ids[position] != token_id:
                raise ValueError(
                    f"request {self.request_id!r}: token {token_id} at prompt "
                    f"position {position} disagrees with the prompt"
                )
            return
        idx = position - self.prompt_len
        if idx < len(self.output_ids):
            self.output_ids[idx] = int(token_id)
        elif idx == len(self.output_ids):
            self.output_ids.append(int(token_id))
        else:
            raise ValueError(
                f"request {self.request_id!r}: output {idx} arrived before outputs "
                f"{len(self.output_ids)}..{idx - 1} (send DecodeItem.output_prefix)"
            )

    def sampled_input(self, position: int) -> int:
        """The token this instance sampled for `position` (a look-ahead step's input)."""
        if self.sampled is None or self.sampled[0] != position:
            held = "nothing" if self.sampled is None else f"the token of position {self.sampled[0]}"
            raise ValueError(
                f"request {self.request_id!r}: a look-ahead decode item (input_token=None) at "
                f"position {position}, but this instance holds {held}: only the master of "
                "the previous one-instance step can run it"
            )
        return self.sampled[1]

    def record_outputs_from(self, start_position: int, token_ids: Sequence[int]) -> None:
        for offset, tok in enumerate(token_ids):
            self.record_token(start_position + offset, tok)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Ids of global positions [start, end) (prompt then known outputs)."""
        seq_len = self.prompt_len + len(self.output_ids)
        if end > seq_len:
            raise ValueError(
                f"request {self.request_id!r}: positions up to {end} requested but "
                f"only {seq_len} tokens are known (prompt {self.prompt_len} + "
                f"{len(self.output_ids)} outputs); send extra_token_ids"
            )
        ids = list(self.prompt_ids[start:end])
        if end > self.prompt_len:
            ids += self.output_ids[max(start - self.prompt_len, 0) : end - self.prompt_len]
        return ids

    def history(self, num_outputs: int) -> tuple[Sequence[int], Sequence[int]]:
        """(prompt ids, the first `num_outputs` outputs) for penalties of output `num_outputs`."""
        return self.prompt_ids, self.output_ids[:num_outputs]
