"""The checked-in Mooncake-format sample trace (tests/sim/data/mooncake_sample.jsonl).

No real trace can be downloaded where these tests run, so the sample is synthetic, in
Mooncake's format: `timestamp` (ms), `input_length`, `output_length`, `hash_ids` (one id
per 512-token block, the last possibly partial; equal ids = equal block contents, as
Mooncake's release assigns them). Its structure: three shared system prompts (2, 4 and 6
blocks) and sessions of 1-3 turns, each turn's prompt extending the previous turn's.

Regenerate with `python -m tests.support.mooncake_sample` (the test checks the file
equals what this writes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BLOCK = 512
SAMPLE_PATH = Path(__file__).resolve().parents[1] / "sim" / "data" / "mooncake_sample.jsonl"


def sample_rows(num_sessions: int = 16, seed: int = 7) -> list[dict]:
    rng = np.random.default_rng(seed)
    next_id = 0

    def new_ids(n: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + n))
        next_id += n
        return ids

    systems = [new_ids(n) for n in (2, 4, 6)]
    rows = []
    t = 0.0
    for _ in range(num_sessions):
        t += float(rng.exponential(800.0))
        ids = list(systems[int(rng.integers(0, 3))])
        turn_t = t
        for _turn in range(int(rng.integers(1, 4))):
            ids += new_ids(int(rng.integers(1, 4)))
            # the last block is partial: 1..511 of its 512 tokens
            length = (len(ids) - 1) * BLOCK + int(rng.integers(1, BLOCK))
            out = int(rng.integers(20, 400))
            rows.append(
                {
                    "timestamp": int(turn_t),
                    "input_length": length,
                    "output_length": out,
                    "hash_ids": list(ids),
                }
            )
            turn_t += float(rng.exponential(5000.0))
    rows.sort(key=lambda r: r["timestamp"])
    return rows


def main() -> None:
    from esp_core.sim.prefix_workloads import write_mooncake_trace

    write_mooncake_trace(SAMPLE_PATH, sample_rows())


if __name__ == "__main__":
    main()
