"""Torch attention with log-sum-exp: the CPU production path (and the GPU fallback).

Same contract as `kernels/naive.py` (the ground truth) but built to run long sequences:

* Memory stays bounded: queries go in blocks of `BLOCK_Q`, keys in runs of at most
  `RUN_K` keys and `RUN_BYTES` of fp32 K+V; nothing the size of the full [Tq, Tk] score
  matrix is ever allocated, so 128K+ tokens run in O(T) memory (plus one mask tile).
  Temporaries stay small on purpose: glibc serves blocks above its mmap threshold (at
  most 32 MiB) with fresh pages, and first-touch page faults then cost more than the
  attention math (measured: a fresh 64 MiB copy runs at ~1.4 GB/s, a reused one at 10+).
* Tiles the causal mask hides completely are skipped; tiles it shows completely run
  without a mask; only the diagonal tiles carry one. Classification uses the min/max of
  the *global* positions in each block, so it is right for any layout (contiguous,
  striped with any start offset, even unsorted) and tight for monotone ones.
* The tile engine is PyTorch's fused CPU flash-attention op
  (`aten._scaled_dot_product_flash_attention_for_cpu`), which returns the LSE beside the
  output; it computes in fp32 here (inputs are upcast per tile). A diagonal tile whose
  mask is exactly top-left causal (or strictly causal) uses the op's own causal path.
  Without that op (other devices, other torch builds) a plain fp32 matmul engine chunked
  over keys does the same job.
* Requests with few queries (decode; chunked-prefill tails) do not loop in Python: their
  keys are cut into chunks, chunks of many requests are gathered into one padded batch,
  run in one fused call with a key-padding mask, and merged back per query row with a
  scatter LSE merge (split-KV, as the GPU decode kernel does).
* A decode step's slot attention (one query per request, short key lists) is cheaper
  still: its padded slot index is built once per step and shared by every layer, and each
  layer does one gather of K/V for the whole batch and one fused call (`_decode_attention`).

All math is fp32; `o` is returned in q's dtype, `lse` in fp32 (natural log of scaled
scores). Rows with no visible key get o = 0, lse = -inf.
"""

from __future__ import annotations

import math
import threading

import torch

from esp_serve.kernels import checks
from esp_serve.kernels.host_layout import HostSeqs

NEG_INF = float("-inf")

BLOCK_Q = 256  # query rows per block on the per-request (prefill) path
BLOCK_K = 512  # key block used to classify the causal mask
RUN_K = 16384  # most keys loaded (and upcast) at once for one query block
RUN_BYTES = 8 << 20  # ... and at most this much fp32 K+V per run
FEW_Q = 64  # requests with at most this many queries take the batched path
CHUNK_K = 2048  # key chunk of the batched (split-KV) path
GROUP_BYTES = 16 << 20  # fp32 K+V gathered for one batched call
MATH_SCORES = 1 << 24  # most score elements the fallback matmul engine materialises

try:  # present on CPU builds of torch >= 2.3; private, hence the guard
    _FUSED_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch build
    _FUSED_CPU = None


# --------------------------------------------------------------------------- tile engine
def _engine(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of batched heads, fp32 math.

    q [B, Hq, M, D], k/v [B, Hkv, N, D] (any dtype/strides; Hkv divides Hq); mask is None
    (all visible), "causal" (top-left: row i sees keys j <= i) or bool [B or 1, 1 or Hq,
    M, N] (True = visible). Returns o [B, M, Hq, D] fp32 and lse [B, M, Hq] fp32; rows
    with no visible key get o = 0, lse = -inf.
    """
    b, hq, m, d = q.shape
    if m == 0 or k.shape[2] == 0:  # the fused op divides by these lengths
        return (
            torch.zeros((b, m, hq, d), dtype=torch.float32, device=q.device),
            torch.full((b, m, hq), NEG_INF, dtype=torch.float32, device=q.device),
        )
    q, k, v = q.float(), k.float(), v.float()
    empty = None  # [B?, 1?, M] rows without any visible key
    if isinstance(mask, torch.Tensor):
        empty = ~mask.any(dim=-1)
    if _FUSED_CPU is not None and q.device.type == "cpu":
        if isinstance(mask, torch.Tensor):
            bias = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, NEG_INF)
            o, lse = _FUSED_CPU(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        else:
            o, lse = _FUSED_CPU(q, k, v, 0.0, mask == "causal", scale=scale)
        o, lse = o.transpose(1, 2), lse.transpose(1, 2)  # [B, M, Hq, D], [B, M, Hq]
    else:
        o, lse = _math_engine(q, k, v, scale, mask)
    if empty is not None and bool(empty.any()):
        empty = empty.transpose(1, 2).expand(lse.shape)  # [B, M, Hq]
        lse = lse.masked_fill(empty, NEG_INF)
        o = o.masked_fill(empty.unsqueeze(-1), 0.0)
    return o, lse


def _math_engine(q, k, v, scale, mask):
    """Matmul engine for devices/builds without the fused op; chunks keys so that at most
    MATH_SCORES score elements exist at once, merging chunks with the online-softmax rule."""
    b, hq, m, d = q.shape
    group = hq // k.shape[1]
    n = k.shape[2]
    if group > 1:  # [B, Hkv, N, D] -> [B, Hq, N, D]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    o = torch.zeros((b, m, hq, d), dtype=torch.float32, device=q.device)
    lse = torch.full((b, m, hq), NEG_INF, dtype=torch.float32, device=q.device)
    step = max(1, MATH_SCORES // max(1, b * hq * m))
    rows = torch.arange(m, device=q.device)
    for j0 in range(0, n, step):
        j1 = min(n, j0 + step)
        s = torch.matmul(q, k[:, :, j0:j1].transpose(-1, -2)) * scale  # [B, Hq, M, n]
        if mask == "causal":
            visible = rows[:, None] >= torch.arange(j0, j1, device=q.device)[None, :]
            s = s.masked_fill(~visible, NEG_INF)
        elif isinstance(mask, torch.Tensor):
            s = s.masked_fill(~mask[..., j0:j1], NEG_INF)
        part_lse = torch.logsumexp(s, dim=-1)  # [B, Hq, M]
        safe = torch.where(torch.isfinite(part_lse), part_lse, 0.0)
        p = torch.exp(s - safe.unsqueeze(-1))  # fully masked rows: exp(-inf) = 0
        part_o = torch.matmul(p, v[:, :, j0:j1])  # [B, Hq, M, D]
        merge_into(o, lse, part_o.transpose(1, 2), part_lse.transpose(1, 2))
    return o, lse


# --------------------------------------------------------------------------- merges
def merge_into(o_acc: torch.Tensor, lse_acc: torch.Tensor, o: torch.Tensor, lse: torch.Tensor) -> None:
    """(o_acc, lse_acc) <- merge of itself with (o, lse), in place; fp32 [..., H, D]/[..., H].

    Guarded (architecture.md §3.1): a side with lse = -inf weighs exactly 0 and its o is ignored;
    both -inf gives (0, -inf). Never evaluates exp(-inf - -inf).
    """
    m = torch.maximum(lse_acc, lse)
    m_safe = torch.where(torch.isfinite(m), m, 0.0)
    w_acc = torch.exp(lse_acc - m_safe)
    w_new = torch.exp(lse - m_safe)
    total = w_acc + w_new
    has = total > 0
    denom = torch.where(has, total, 1.0)
    o_new = torch.where(torch.isfinite(lse).unsqueeze(-1), o, 0.0)
    o_acc.mul_((w_acc / denom).unsqueeze(-1)).add_(o_new * (w_new / denom).unsqueeze(-1))
    lse_acc.copy_(torch.where(has, m_safe + torch.log(denom), NEG_INF))


def _scatter_merge(o_acc, lse_acc, rows, o, lse) -> None:
    """Merge partials (o [R, H, D], lse [R, H]) into rows `rows` [R] (repeats allowed) of
    (o_acc [T, H, D], lse_acc [T, H]) in place: the guarded rule over segments."""
    uniq, inv = torch.unique(rows, return_inverse=True)
    acc_o, acc_lse = o_acc[uniq], lse_acc[uniq]  # [U, H, D], [U, H]
    m = acc_lse.scatter_reduce(0, inv[:, None].expand_as(lse), lse, "amax", include_self=True)
    m_safe = torch.where(torch.isfinite(m), m, 0.0)
    w_acc = torch.exp(acc_lse - m_safe)
    w = torch.exp(lse - m_safe[inv])  # [R, H]
    total = w_acc.index_add(0, inv, w)
    num = (acc_o * w_acc.unsqueeze(-1)).index_add_(
        0, inv, torch.where(torch.isfinite(lse).unsqueeze(-1), o, 0.0) * w.unsqueeze(-1)
    )
    has = total > 0
    denom = torch.where(has, total, 1.0)
    o_acc[uniq] = num / denom.unsqueeze(-1)
    lse_acc[uniq] = torch.where(has, m_safe + torch.log(denom), NEG_INF)


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partials of the same queries: o_i [T, H, D], lse_i [T, H] -> (o, lse).

    m = max lse_i; a row with m = -inf has no keys anywhere -> (0, -inf). Otherwise
    w_i = exp(lse_i - m), lse = m + log sum w_i, o = sum w_i o_i / sum w_i. Partials with
    lse = -inf get weight exactly 0 (their o is ignored even if it holds garbage). o is
    returned in the dtype of outs[0], lse in fp32.
    """
    checks.partials(outs, lses)
    lse_stack = torch.stack([x.float() for x in lses])  # [k, T, H]
    m = lse_stack.max(dim=0).values  # [T, H]
    m_safe = torch.where(torch.isfinite(m), m, 0.0)
    w = torch.exp(lse_stack - m_safe)  # empty partials: exp(-inf) = 0
    w_sum = w.sum(dim=0)
    o = torch.zeros(outs[0].shape, dtype=torch.float32, device=outs[0].device)
    for w_i, o_i, lse_i in zip(w, outs, lse_stack):  # k is small: a loop over partials
        o += w_i.unsqueeze(-1) * torch.where(torch.isfinite(lse_i).unsqueeze(-1), o_i.float(), 0.0)
    has = w_sum > 0
    denom = torch.where(has, w_sum, 1.0)
    o = o / denom.unsqueeze(-1)
    lse = torch.where(has, m_safe + torch.log(denom), NEG_INF)
    return o.to(outs[0].dtype), lse


# --------------------------------------------------------------------------- drivers
_scratch = threading.local()


def _buffer(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable flat scratch tensor (per thread, CPU only): gathered keys are written
    into the same pages call after call instead of fresh ones (first-touch page faults
    made fresh 16 MiB gathers 5x slower than refilled ones on the CI host). Valid until
    the next request for the same name; holds at most ~GROUP_BYTES per thread."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)  # the CUDA allocator caches
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get((name, dtype))
    if buf is None or buf.numel() < numel:
        # A normal tensor, even when the first caller runs under torch.inference_mode():
        # an inference tensor could not be written by a later caller outside it.
        with torch.inference_mode(False):
            buf = bufs[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


class _Keys:
    """Where a call's keys live, loaded as fp32 on demand.

    varlen: k/v [N, Hkv, D] and positions [N] (causal mask). Slot pool: `pool` is the
    kv_layer [slots, 2, Hkv, D] and `index[i]` the slot of key i; K and V of a slot are
    one contiguous row there, gathered in one pass. Loaded tensors may be views of
    scratch buffers: use them before the next load."""

    def __init__(self, k, v, index=None, pos=None, pool=None):
        self.k, self.v, self.index, self.pos = k, v, index, pos
        self.pool = pool if pool is not None and pool.is_contiguous() else None

    def gather(self, key_i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys key_i [...] -> k, v fp32 [..., Hkv, D]."""
        hkv, d = self.k.shape[1], self.k.shape[2]
        if self.index is None:
            return self.k[key_i].float(), self.v[key_i].float()
        slots = self.index[key_i]
        if self.pool is None:
            return self.k[slots].float(), self.v[slots].float()
        n, row = slots.numel(), 2 * hkv * d
        raw = _buffer("gather", n * row, self.pool.dtype, self.pool.device).view(n, row)
        torch.index_select(self.pool.view(self.pool.shape[0], row), 0, slots.reshape(-1), out=raw)
        if raw.dtype != torch.float32:
            raw = _buffer("upcast", n * row, torch.float32, raw.device).view(n, row).copy_(raw)
        kv = raw.view(*key_i.shape, 2, hkv, d)
        return kv[..., 0, :, :], kv[..., 1, :, :]

    def load(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys start..stop as fp32 [1, Hkv, n, D]."""
        if self.index is None:
            k, v = self.k[start:stop], self.v[start:stop]
            if k.dtype != torch.float32:
                n, hkv, d = k.shape
                kv = _buffer("upcast", 2 * k.numel(), torch.float32, k.device).view(2, n, hkv, d)
                kv[0].copy_(k)
                kv[1].copy_(v)
                k, v = kv[0], kv[1]
        else:
            k, v = self.gather(torch.arange(start, stop, device=self.index.device))
        return k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)


def run_keys(hkv: int, d: int) -> int:
    """Keys per run: RUN_K, fewer when fp32 K+V would pass RUN_BYTES; whole BLOCK_Ks."""
    by_bytes = RUN_BYTES // (8 * hkv * d)
    return max(BLOCK_K, min(RUN_K, by_bytes) // BLOCK_K * BLOCK_K)


def _mask_kind(visible: torch.Tensor) -> str:
    """Name the pattern of a bool tile [m, n]: 'causal' (j <= i), 'strict' (j < i), 'any'."""
    m, n = visible.shape
    tril = torch.ones(m, n, dtype=torch.bool, device=visible.device).tril_()
    if torch.equal(visible, tril):
        return "causal"
    if m > 1 and torch.equal(visible, tril.tril(-1)):
        return "strict"
    return "any"


def _attend_run(q_blk, keys: _Keys, j0, j1, scale, visible):
    """One query block [m, Hq, D] against keys j0..j1; visible None or bool [m, n].
    Returns o [m, Hq, D], lse [m, Hq] fp32."""
    k, v = keys.load(j0, j1)
    q4 = q_blk.transpose(0, 1).unsqueeze(0)  # [1, Hq, m, D]
    kind = "full" if visible is None else _mask_kind(visible)
    if kind == "full":
        o, lse = _engine(q4, k, v, scale, None)
    elif kind == "causal":
        o, lse = _engine(q4, k, v, scale, "causal")
    elif kind == "strict":
        # Strictly causal (j < i): row 0 sees nothing, rows 1.. are top-left causal.
        m, hq, d = q_blk.shape
        o = torch.zeros((1, m, hq, d), dtype=torch.float32, device=q_blk.device)
        lse = torch.full((1, m, hq), NEG_INF, dtype=torch.float32, device=q_blk.device)
        o[:, 1:], lse[:, 1:] = _engine(q4[:, :, 1:], k, v, scale, "causal")
    else:
        o, lse = _engine(q4, k, v, scale, visible[None, None])
    return o[0], lse[0]


def _per_request(q, keys: _Keys, qs, qe, ks, ke, q_pos, causal, scale, o_out, lse_out):
    """Blockwise attention of one request's queries qs..qe over its keys ks..ke."""
    n_k = ke - ks
    if causal:
        kp = keys.pos[ks:ke]
        n_blocks = -(-n_k // BLOCK_K)
        pad = n_blocks * BLOCK_K - n_k
        # pad the tail block with a copy of its own last key: min/max stay exact
        blocks = torch.cat([kp, kp[-1:].expand(pad)]).view(n_blocks, BLOCK_K)
        kmin, kmax = blocks.amin(1), blocks.amax(1)
    run_max = run_keys(keys.k.shape[1], keys.k.shape[2])
    for i0 in range(qs, qe, BLOCK_Q):
        i1 = min(qe, i0 + BLOCK_Q)
        q_blk = q[i0:i1].float()  # upcast once per block, not once per key run
        acc_o = torch.zeros(q_blk.shape, dtype=torch.float32, device=q.device)
        acc_lse = torch.full(q_blk.shape[:2], NEG_INF, dtype=torch.float32, device=q.device)
        if causal:
            qp = q_pos[i0:i1]
            qmin, qmax = qp.min(), qp.max()
            # 0 = skip (all hidden), 1 = full (all visible), 2 = partial
            cls = torch.where(kmin > qmax, 0, torch.where(kmax <= qmin, 1, 2)).tolist()
        else:
            cls = [1] * (-(-n_k // BLOCK_K))
        b = 0
        while b < len(cls):  # runs of equal class, at most run_max keys each
            c, e = cls[b], b + 1
            while e < len(cls) and cls[e] == c and (e + 1 - b) * BLOCK_K <= run_max:
                e += 1
            if c != 0:
                j0, j1 = ks + b * BLOCK_K, min(ke, ks + e * BLOCK_K)
                visible = (qp[:, None] >= keys.pos[j0:j1][None, :]) if c == 2 else None
                o, lse = _attend_run(q_blk, keys, j0, j1, scale, visible)
                merge_into(acc_o, acc_lse, o, lse)
            b = e
        o_out[i0:i1], lse_out[i0:i1] = acc_o, acc_lse


def _batched(q, keys: _Keys, reqs, cq, ck, q_pos, causal, scale, o_out, lse_out):
    """Requests with few queries: split keys into chunks of <= CHUNK_K, batch the chunks
    of many requests (padded) into one fused call each, then scatter-merge per row."""
    dev = q.device
    req = torch.tensor(reqs, dtype=torch.int64)
    cq_t, ck_t = torch.tensor(cq, dtype=torch.int64), torch.tensor(ck, dtype=torch.int64)
    n_q, n_k = (cq_t[1:] - cq_t[:-1])[req], (ck_t[1:] - ck_t[:-1])[req]
    n_chunks = (n_k + CHUNK_K - 1) // CHUNK_K
    piece_req = req.repeat_interleave(n_chunks)  # [P] request of each chunk
    first = torch.cumsum(n_chunks, 0) - n_chunks
    piece_j = torch.arange(int(n_chunks.sum())) - first.repeat_interleave(n_chunks)
    piece_k0 = ck_t[piece_req] + piece_j * CHUNK_K
    piece_nk = torch.minimum(ck_t[piece_req + 1] - piece_k0, torch.tensor(CHUNK_K))
    piece_nq = (cq_t[1:] - cq_t[:-1])[piece_req]
    order = torch.argsort(piece_nk, stable=True)  # similar lengths share a padded batch
    piece_req, piece_k0, piece_nk, piece_nq = (x[order] for x in (piece_req, piece_k0, piece_nk, piece_nq))
    m = int(n_q.max())
    hkv, d = keys.k.shape[1], keys.k.shape[2]
    group = q.shape[1] // hkv
    keys_per_group = max(CHUNK_K, GROUP_BYTES // (8 * hkv * d))
    nk_list = piece_nk.tolist()
    p0 = 0
    while p0 < len(nk_list):
        guess = max(1, keys_per_group // max(1, nk_list[p0]))
        width = nk_list[min(len(nk_list), p0 + guess) - 1]
        p1 = min(len(nk_list), p0 + max(1, keys_per_group // width))
        width = nk_list[p1 - 1]
        sl = slice(p0, p1)
        rows_q = cq_t[piece_req[sl]][:, None] + torch.arange(m)  # [P, m]
        q_ok = torch.arange(m)[None, :] < piece_nq[sl][:, None]
        key_i = piece_k0[sl][:, None] + torch.arange(width)  # [P, w]
        k_ok = torch.arange(width)[None, :] < piece_nk[sl][:, None]
        rows_q = torch.where(q_ok, rows_q, 0).to(dev)
        key_i = torch.where(k_ok, key_i, 0).to(dev)
        q_ok, k_ok = q_ok.to(dev), k_ok.to(dev)
        n_p = p1 - p0
        # GQA folded into rows: the G query heads of a kv head become G*m rows of that
        # head, so each K/V row is read once per kv head, not once per query head.
        qg = q[rows_q].float().view(n_p, m, hkv, group, d)
        qg = qg.permute(0, 2, 3, 1, 4).reshape(n_p, hkv, group * m, d)  # rows (g, i)
        kg, vg = keys.gather(key_i)  # [P, w, Hkv, D] fp32
        kg, vg = kg.transpose(1, 2), vg.transpose(1, 2)  # [P, Hkv, w, D]
        visible = k_ok[:, None, :].expand(-1, m, -1)  # [P, m, w]
        if causal:
            visible = visible & (q_pos[rows_q][:, :, None] >= keys.pos[key_i][:, None, :])
        visible = visible[:, None].expand(-1, group, -1, -1).reshape(n_p, 1, group * m, width)
        o, lse = _engine(qg, kg, vg, scale, visible)  # [P, G*m, Hkv, D], [P, G*m, Hkv]
        o = o.view(n_p, group, m, hkv, d).permute(0, 2, 3, 1, 4).reshape(n_p, m, hkv * group, d)
        lse = lse.view(n_p, group, m, hkv).permute(0, 2, 3, 1).reshape(n_p, m, hkv * group)
        _scatter_merge(o_out, lse_out, rows_q[q_ok], o[q_ok], lse[q_ok])
        p0 = p1


def _run(q, keys: _Keys, cq, ck, q_pos, causal, scale):
    """Shared driver: batched path for requests with few queries, blockwise otherwise."""
    o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], NEG_INF, dtype=torch.float32, device=q.device)
    few, many = [], []
    for b in range(len(cq) - 1):
        if cq[b + 1] > cq[b] and ck[b + 1] > ck[b]:
            (few if cq[b + 1] - cq[b] <= FEW_Q else many).append(b)
    if few:
        _batched(q, keys, few, cq, ck, q_pos, causal, scale, o, lse)
    for b in many:
        _per_request(q, keys, cq[b], cq[b + 1], ck[b], ck[b + 1], q_pos, causal, scale, o, lse)
    return o.to(q.dtype), lse


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float | None = None,
    causal: bool = True,
    *,
    host_q: HostSeqs | None = None,
    host_k: HostSeqs | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a varlen batch with masks on global positions.

    q [Tq, Hq, D], k/v [Tk, Hkv, D]; q_pos [Tq], k_pos [Tk] int global positions;
    cu_seqlens_q/k [B+1] int offsets of each request's tokens. Query i of request b sees
    key j of request b iff `q_pos[i] >= k_pos[j]` (causal) or always (causal=False).
    Returns o [Tq, Hq, D] (dtype of q), lse [Tq, Hq] fp32. host_q/host_k: host copies of
    the offsets (`kernels/host_layout.py`).
    """
    cq, ck = checks.varlen(q, k, v, q_pos, k_pos, cu_seqlens_q, cu_seqlens_k, host_q, host_k)
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    return _run(q, _Keys(k, v, pos=k_pos), cq, ck, q_pos, causal, scale)


# --------------------------------------------------------------------------- decode steps
DECODE_WIDTH = 4096  # longest key list the padded decode path takes in any batch
DECODE_BYTES = 32 << 20  # most fp32 K+V it gathers for one layer
# Longer lists still take it while padding adds at most this fraction of the batch's real
# keys (one request: none). A lone long-context stream is the case: at 8K keys its decode
# step halves against the key-chunked driver (one gather and one fused call per layer).
DECODE_PAD_SLACK = 0.25
# Why gather even a request whose slots are consecutive (its prompt's KV): reading them in
# place (strided [Hkv, L, D] views of the pool, no copy) looks 30% faster in a loop over
# one layer's KV, which stays in cache, but is slower inside a model step, where each
# layer's KV comes from DRAM: 1.62 vs 1.30 ms per layer at 4,000 keys (SmolLM2's 3 KV
# heads of 64), measured with decode steps alternating between the two in one process.
# The fused op walks each head's rows at the pool's row stride; the gather streams whole
# rows (all heads' K and V) and the op then reads a compact copy.


class _DecodeIndex:
    """The padded key layout of one decode step (one query per request), built once and
    reused by every layer: the step's slot lists do not change between layers.

    rows [B * W] int64: the pool slot of key j of request b at b * W + j (padding
    repeats a valid slot); bias [B, 1, 1, W] fp32: 0 for real keys, -inf for padding;
    empty [B] bool: requests without any key (o = 0, lse = -inf)."""

    def __init__(self, slot_ids: torch.Tensor, cs: list[int]) -> None:
        dev = slot_ids.device
        if len(cs) == 2 and cs[1] > 0:  # one request with keys: its slots, unpadded
            self.batch, self.width, self.empty = 1, cs[1], None
            self.rows = slot_ids.long()
            self.bias = torch.zeros(1, 1, 1, cs[1], device=dev)  # the same all-zero bias
            return
        lengths = torch.tensor([b - a for a, b in zip(cs, cs[1:])], dtype=torch.int64)  # [B]
        self.batch, self.width = len(cs) - 1, max(1, int(lengths.max()) if len(cs) > 1 else 1)
        starts = torch.tensor(cs[:-1], dtype=torch.int64)
        j = torch.arange(self.width)
        valid = j[None, :] < lengths[:, None]  # [B, W]
        pos = torch.where(valid, starts[:, None] + j[None, :], 0)
        self.empty = (lengths == 0).to(dev) if bool((lengths == 0).any()) else None
        if slot_ids.numel() == 0:
            self.rows = torch.zeros(self.batch * self.width, dtype=torch.int64, device=dev)
        else:
            self.rows = slot_ids.long()[pos.to(dev).reshape(-1)]
        # an empty request sees its padding unmasked (no all--inf row reaches the fused op);
        # its output is replaced afterwards
        hidden = ~valid & (lengths > 0)[:, None]
        self.bias = torch.zeros(hidden.shape).masked_fill_(hidden, NEG_INF).view(self.batch, 1, 1, -1).to(dev)


_decode_cache = threading.local()
DECODE_CACHE = 4  # indexes kept: a multi-instance step alternates several slot lists per layer


def _decode_index(slot_ids: torch.Tensor, cu_slots: torch.Tensor, cs: list[int]) -> _DecodeIndex:
    """The step's _DecodeIndex, cached: every layer of a step passes the same index tensors.
    A hit needs the same tensor objects with the same contents (compared with copies taken
    when the index was built: inference tensors have no version counter to tell an
    in-place change). The cache holds the tensors, so their ids cannot be reused."""
    entries = getattr(_decode_cache, "entries", None)
    if entries is None:
        entries = _decode_cache.entries = []
    for ids, cu, ids_copy, cs_copy, index in entries:
        if ids is slot_ids and cu is cu_slots and cs == cs_copy and torch.equal(ids, ids_copy):
            return index
    index = _DecodeIndex(slot_ids, cs)
    entries.insert(0, (slot_ids, cu_slots, slot_ids.clone(), list(cs), index))
    del entries[DECODE_CACHE:]
    return index


def _decode_fits(cq: list[int], cs: list[int], row_bytes: int) -> bool:
    """One query per request, keys short enough (or padded little enough) to gather into
    one [B, W] block per layer within DECODE_BYTES."""
    if any(b - a != 1 for a, b in zip(cq, cq[1:])):
        return False
    lengths = [b - a for a, b in zip(cs, cs[1:])]
    width = max(lengths, default=0)
    padded = len(lengths) * width  # rows the gather writes, padding included
    if padded * row_bytes > DECODE_BYTES:
        return False
    return width <= DECODE_WIDTH or padded <= (1.0 + DECODE_PAD_SLACK) * sum(lengths)


def _decode_attention(q, kv_layer, index: _DecodeIndex, scale):
    """q [B, Hq, D] against the padded keys of `index`: one gather of K and V for the
    whole batch, one fused call with GQA folded into query rows. o [B, Hq, D] fp32,
    lse [B, Hq] fp32."""
    b, hq, d = q.shape
    hkv = kv_layer.shape[2]
    row = 2 * hkv * d
    raw = _buffer("decode", index.rows.numel() * row, kv_layer.dtype, kv_layer.device).view(-1, row)
    torch.index_select(kv_layer.view(kv_layer.shape[0], row), 0, index.rows, out=raw)
    kv = raw.float().view(b, index.width, 2, hkv, d)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [B, Hkv, W, D]
    q4 = q.float().reshape(b, hkv, hq // hkv, d)  # query head h reads kv head h // G
    if _FUSED_CPU is not None and q.device.type == "cpu":
        o, lse = _FUSED_CPU(q4, k, v, 0.0, False, attn_mask=index.bias, scale=scale)  # [B, Hkv, G, D]
    else:
        s = torch.matmul(q4, k.transpose(-1, -2)) * scale + index.bias  # [B, Hkv, G, W]
        lse = torch.logsumexp(s, dim=-1)
        o = torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v)
    o, lse = o.reshape(b, hq, d), lse.reshape(b, hq)
    if index.empty is not None:
        o = o.masked_fill(index.empty[:, None, None], 0.0)
        lse = lse.masked_fill(index.empty[:, None], NEG_INF)
    return o, lse


def slot_attention(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_layer: torch.Tensor,
    slot_ids: torch.Tensor,
    cu_slots: torch.Tensor,
    scale: float | None = None,
    *,
    host_q: HostSeqs | None = None,
    host_slots: HostSeqs | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention of queries over KV gathered from a token-slot pool, no mask.

    q [Tq, Hq, D] (decode: one query per request); kv_layer [slots, 2, Hkv, D] is one
    layer of the pool; slot_ids [S] int lists, request after request, the slots whose
    tokens each request's queries see (any order, any subset: every listed token is
    older than the queries); cu_slots [B+1] offsets into slot_ids. A request with no
    slots gets o = 0, lse = -inf.
    """
    cq, cs = checks.slots(q, cu_seqlens_q, kv_layer, slot_ids, cu_slots, host_q, host_slots)
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    if kv_layer.is_contiguous() and _decode_fits(cq, cs, 8 * kv_layer.shape[2] * kv_layer.shape[3]):
        o, lse = _decode_attention(q, kv_layer, _decode_index(slot_ids, cu_slots, cs), scale)
        return o.to(q.dtype), lse
    keys = _Keys(kv_layer[:, 0], kv_layer[:, 1], index=slot_ids.long(), pool=kv_layer)
    return _run(q, keys, cq, cs, None, False, scale)


def write_kv(kv_layer: torch.Tensor, slot_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store k/v [n, Hkv, D] into slots slot_ids [n] of kv_layer [slots, 2, Hkv, D]."""
    checks.write(kv_layer, slot_ids, k, v)
    kv_layer[slot_ids, 0] = k.to(kv_layer.dtype)
    kv_layer[slot_ids, 1] = v.to(kv_layer.dtype)
