"""Host cost of prefix-affinity routing, per request, in one process (no Ray):

    python benchmarks/bench_routing_affinity.py --prompt-tokens 12288 --groups 2 8

Prints the time to hash a prompt's blocks (`block_hash_chain`, done once in the ingress's
worker thread), to rank the groups for it (`rank_with_affinity`, on the router's loop,
the prompt fully remembered on one group among others that each remember `--documents`
other documents) and to remember it after routing (`RoutedPrefixes.record`).
"""

from __future__ import annotations

import argparse
import random
import timeit

from esp_core.sched.prefix_cache import block_hash_chain
from esp_serve.app.affinity import AffinityPolicy, RoutedPrefixes, rank_with_affinity
from esp_serve.app.saturation import GroupLoad


def _us(fn, number: int) -> float:
    return timeit.timeit(fn, number=number) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=12288)
    ap.add_argument("--block-tokens", type=int, default=64)
    ap.add_argument("--groups", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--documents", type=int, default=50, help="other 640-token documents per group")
    ap.add_argument("--repeat", type=int, default=2000)
    args = ap.parse_args()
    rng = random.Random(0)
    bt = args.block_tokens
    prompt = tuple(rng.randrange(30000) for _ in range(args.prompt_tokens))
    hashes = block_hash_chain(prompt, bt)
    hash_us = _us(lambda: block_hash_chain(prompt, bt), max(1, args.repeat // 10))
    print(f"block_hash_chain, {args.prompt_tokens}-token prompt: {hash_us:.0f} us")
    policy = AffinityPolicy(block_tokens=bt)
    for groups in args.groups:
        routed: RoutedPrefixes[int] = RoutedPrefixes(policy.max_blocks_per_group)
        for g in range(groups):
            for _ in range(args.documents):
                doc = tuple(rng.randrange(30000) for _ in range(640))
                routed.record(g, block_hash_chain(doc, bt))
        routed.record(0, hashes)
        loads = {g: GroupLoad(100 * g, 1 << 16, 0) for g in range(groups)}
        assert rank_with_affinity(loads, len(prompt), hashes, routed, policy)[0] == [0]
        rank_us = _us(lambda: rank_with_affinity(loads, len(prompt), hashes, routed, policy), args.repeat)
        record_us = _us(lambda: routed.record(0, hashes), args.repeat)
        print(f"{groups} groups: rank_with_affinity {rank_us:.1f} us, record {record_us:.1f} us")


if __name__ == "__main__":
    main()
