"""Shared-prefix workloads: hash sharing exactly as specified, determinism, Mooncake traces."""

import json
from collections import defaultdict

import pytest

from esp_core.sim.cli import main
from esp_core.sim.prefix_workloads import (
    DocQAConfig,
    MultiTurnConfig,
    chain_hashes,
    docqa_hashes,
    generate_docqa,
    generate_multiturn,
    read_mooncake_trace,
)
from esp_core.sim.workloads import PROMPT_RANGES, read_trace, with_rate, write_trace
from tests.support.mooncake_sample import SAMPLE_PATH, sample_rows


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def assert_chained(requests):
    """Equal hash at block i means equal hashes at every block before it."""
    prefix_of = {}
    for r in requests:
        for i, h in enumerate(r.block_hashes):
            assert prefix_of.setdefault(h, r.block_hashes[:i]) == r.block_hashes[:i]


def test_chain_hashes_are_chained_and_stable():
    a = chain_hashes([(1, 0), (1, 1), (2, 5)])
    b = chain_hashes([(1, 0), (1, 1), (2, 6)])
    c = chain_hashes([(9, 9), (1, 1)])
    assert a[:2] == b[:2] and a[2] != b[2]
    assert c[1] != a[1]  # same block content after a different prefix: a different hash
    assert a == chain_hashes([(1, 0), (1, 1), (2, 5)])  # no per-process salt
    assert all(0 <= h < 2**63 for h in a)


def test_docqa_hashes_share_only_blocks_inside_the_document():
    q0 = docqa_hashes(doc=3, question=0, doc_tokens=1000, prompt_tokens=1050, block=256)
    q1 = docqa_hashes(doc=3, question=1, doc_tokens=1000, prompt_tokens=1030, block=256)
    other_doc = docqa_hashes(doc=4, question=0, doc_tokens=1000, prompt_tokens=1050, block=256)
    assert len(q0) == len(q1) == 4  # 1050 // 256 full blocks
    assert q0[:3] == q1[:3]  # blocks 0-2 lie inside the 1000-token document
    assert q0[3] != q1[3]  # block 3 holds the document's end and the question
    assert not set(q0) & set(other_doc)


def test_docqa_workload_structure():
    cfg = DocQAConfig()
    reqs = generate_docqa(41, rate=1.0, seed=3, config=cfg)
    assert len(reqs) == 41
    assert [r.arrival_s for r in reqs] == sorted(r.arrival_s for r in reqs)
    docs = defaultdict(dict)
    for r in reqs:
        d, q = r.request_id[1:].split("q")
        docs[int(d)][int(q)] = r
    assert len(docs) == 11 and sorted(docs[10]) == [0]  # 41 = 10 x 4 + 1
    lo, hi = PROMPT_RANGES["l-eval"].lo, PROMPT_RANGES["l-eval"].hi
    for qs in docs.values():
        first = qs[0]
        for r in qs.values():
            assert len(r.block_hashes) == r.prompt_tokens // cfg.block_tokens
            assert lo + 20 <= r.prompt_tokens <= hi + 80
            assert r.arrival_s >= first.arrival_s
        if len(qs) < 2:
            continue
        shared = min(
            common_prefix(a.block_hashes, b.block_hashes)
            for a in qs.values()
            for b in qs.values()
            if a is not b
        )
        for r in qs.values():
            # what is not shared is at most the document's partial block + the question
            assert 20 <= r.prompt_tokens - shared * cfg.block_tokens < cfg.block_tokens + 80
    by_doc = {d: {h for r in qs.values() for h in r.block_hashes} for d, qs in docs.items()}
    assert not by_doc[0] & by_doc[1]
    assert_chained(reqs)


def test_docqa_is_deterministic_by_seed():
    assert generate_docqa(20, 1.0, seed=5) == generate_docqa(20, 1.0, seed=5)
    assert generate_docqa(20, 1.0, seed=5) != generate_docqa(20, 1.0, seed=6)


def test_multiturn_turns_extend_the_previous_prompt():
    cfg = MultiTurnConfig()
    reqs = generate_multiturn(30, rate=2.0, seed=1, config=cfg)
    assert len(reqs) == 30
    convs = defaultdict(dict)
    for r in reqs:
        c, t = r.request_id[1:].split("t")
        convs[int(c)][int(t)] = r
    for turns in convs.values():
        for t in range(1, len(turns)):
            prev, cur = turns[t - 1], turns[t]
            user = cur.prompt_tokens - prev.prompt_tokens - prev.output_tokens
            assert cfg.user_tokens.lo <= user <= cfg.user_tokens.hi
            assert cur.block_hashes[: len(prev.block_hashes)] == prev.block_hashes
            assert cur.arrival_s > prev.arrival_s
        for r in turns.values():
            assert len(r.block_hashes) == r.prompt_tokens // cfg.block_tokens
    hashes = [{h for r in turns.values() for h in r.block_hashes} for turns in convs.values()]
    assert not set.intersection(*hashes[:2])
    assert_chained(reqs)
    assert generate_multiturn(30, 2.0, seed=1) == reqs


def test_retiming_and_traces_keep_block_hashes(tmp_path):
    reqs = generate_docqa(8, 1.0, seed=0)
    retimed = with_rate(reqs, 3.0)
    assert [r.block_hashes for r in retimed] == [r.block_hashes for r in reqs]
    path = tmp_path / "t.jsonl"
    write_trace(path, reqs)
    assert read_trace(path) == reqs


def test_mooncake_sample_is_what_the_generator_writes():
    rows = [json.loads(line) for line in SAMPLE_PATH.read_text().splitlines()]
    assert rows == sample_rows()


def test_mooncake_reader_on_the_sample():
    rows = [json.loads(line) for line in SAMPLE_PATH.read_text().splitlines()]
    reqs = read_mooncake_trace(SAMPLE_PATH)
    assert len(reqs) == len(rows) == 31
    by_time = sorted(rows, key=lambda d: d["timestamp"])
    for r, d in zip(reqs, by_time):
        assert r.arrival_s == pytest.approx(d["timestamp"] / 1000)
        assert (r.prompt_tokens, r.output_tokens) == (d["input_length"], d["output_length"])
        assert len(r.block_hashes) == d["input_length"] // 512  # full blocks only
    for a, ra in zip(by_time, reqs):
        for b, rb in zip(by_time, reqs):
            ids = common_prefix(a["hash_ids"], b["hash_ids"])
            full = min(ids, len(ra.block_hashes), len(rb.block_hashes))
            assert common_prefix(ra.block_hashes, rb.block_hashes) == full
    assert_chained(reqs)


def test_mooncake_reader_names_a_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"timestamp": 1, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]}\n{"timestamp": 2}\n'
    )
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_mooncake_trace(path)


def test_cli_sweeps_docqa_and_runs_a_mooncake_trace(tmp_path, capsys):
    out = tmp_path / "s.json"
    args = ["sweep", "--workload", "docqa", "--policy", "vllm-apc", "--rates", "0.3", "--quick"]
    assert main([*args, "--num-requests", "24", "--quiet", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["block_tokens"] == 256
    assert 0.5 < data["points"][0]["prefix_hit_rate"] <= 0.75  # 3 of 4 questions hit
    run_out = tmp_path / "r.json"
    assert main(["run", "--policy", "vllm-apc", "--trace", str(SAMPLE_PATH), "--json", str(run_out)]) == 0
    run = json.loads(run_out.read_text())
    assert run["config"]["block_tokens"] == 512
    assert run["point"]["completed"] == 31 and run["point"]["prefix_hit_rate"] > 0.3
    trace = tmp_path / "t.jsonl"
    assert (
        main(["trace", "--workload", "multiturn", "--rate", "1", "--num-requests", "8", "--out", str(trace)])
        == 0
    )
    assert read_trace(trace) == sorted(generate_multiturn(8, 1.0), key=lambda r: r.arrival_s)


def test_generating_at_a_rate_scales_time_only():
    """Gaps are in mean inter-arrival times: at 3x the rate, every arrival comes at a third
    of the time and documents / conversations interleave exactly alike."""
    for gen in (generate_docqa, generate_multiturn):
        slow, fast = gen(40, 1.0, seed=4), gen(40, 3.0, seed=4)
        assert [r.request_id for r in fast] == [r.request_id for r in slow]
        assert [r.arrival_s for r in fast] == pytest.approx([r.arrival_s / 3 for r in slow])
