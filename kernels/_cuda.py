"""The numba CUDA kernels, in a module of their own: ``numba.cuda`` is imported only when a CUDA
path runs, and module-level kernels are what the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) can
patch. Launch wrappers, validation and the specification live in pooling.py, fusion.py and topk.py.
"""

from __future__ import annotations

import math

from numba import cuda, float32

NORM_EPS = 1e-12
POOL_MAX_THREADS = 256  # shared-memory size of the norm reduction; launches use a power of two <= this
RRF_K = 60  # as in fusion.py


# -- pooling: one block per row ---------------------------------------------------------------------
@cuda.jit
def pool_kernel(hidden, mask, normalized, pooled):  # pragma: no cover - compiled
    # one block per row; threads stride over d; block reduction for the norm
    i = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    length = hidden.shape[1]
    d = hidden.shape[2]
    partial = cuda.shared.array(POOL_MAX_THREADS, float32)
    count = float32(0.0)
    for t in range(length):
        count += float32(mask[i, t])
    count = max(count, float32(1.0))
    sq = float32(0.0)
    j = tid
    while j < d:
        acc = float32(0.0)
        for t in range(length):
            m = mask[i, t]
            if m != 0:
                acc += float32(m) * hidden[i, t, j]
        v = acc / count
        pooled[i, j] = v
        sq += v * v
        j += nthreads
    partial[tid] = sq
    cuda.syncthreads()
    stride = nthreads // 2
    while stride > 0:
        if tid < stride:
            partial[tid] += partial[tid + stride]
        cuda.syncthreads()
        stride //= 2
    norm = math.sqrt(partial[0])
    norm = max(norm, float32(NORM_EPS))
    j = tid
    while j < d:
        normalized[i, j] = pooled[i, j] / norm
        j += nthreads


# -- fusion: one thread per position of dense + lexical --------------------------------------------
@cuda.jit(device=True)
def id_at(dense_ids, lexical_ids, pos):  # pragma: no cover - compiled
    a = dense_ids.shape[0]
    return dense_ids[pos] if pos < a else lexical_ids[pos - a]


@cuda.jit
def fusion_groups(dense_ids, lexical_ids, lexical_scores, is_first, dr, lr, lex, counters, top):  # pragma: no cover
    # one thread per position of dense + lexical: is it the first occurrence of its id; if so,
    # its last dense and lexical positions (1-based ranks) and lexical score
    pos = cuda.grid(1)
    a = dense_ids.shape[0]
    n = a + lexical_ids.shape[0]
    if pos >= n:
        return
    x = id_at(dense_ids, lexical_ids, pos)
    for j in range(pos):
        if id_at(dense_ids, lexical_ids, j) == x:
            is_first[pos] = 0
            return
    is_first[pos] = 1
    cuda.atomic.add(counters, 0, 1)
    rd = 0
    rl = 0
    for j in range(pos, n):
        if id_at(dense_ids, lexical_ids, j) == x:
            if j < a:
                rd = j + 1
            else:
                rl = j - a + 1
    dr[pos] = rd
    lr[pos] = rl
    if rl > 0:
        lex[pos] = lexical_scores[rl - 1]
        cuda.atomic.add(counters, 1, 1)
        cuda.atomic.max(top, 0, lexical_scores[rl - 1])
    else:
        lex[pos] = 0.0


@cuda.jit
def fusion_scores(is_first, dr, lr, lex, union_dense, top, weighted, w, score):  # pragma: no cover
    pos = cuda.grid(1)
    if pos >= is_first.shape[0] or is_first[pos] == 0:
        return
    if weighted:
        upos = 0
        for j in range(pos):
            upos += is_first[j]
        t = top[0]
        if t == 0.0:
            t = 1.0
        score[pos] = w * union_dense[upos] + (1.0 - w) * lex[pos] / t
    else:
        s = 0.0
        if dr[pos] > 0:
            s = s + 1.0 / (RRF_K + dr[pos])
        if lr[pos] > 0:
            s = s + 1.0 / (RRF_K + lr[pos])
        score[pos] = s


@cuda.jit
def fusion_select(dense_ids, lexical_ids, is_first, dr, lr, score, k, out_ids, out_scores, out_dr, out_lr):  # pragma: no cover
    # rank of each candidate = number of candidates before it in (score desc, id asc)
    pos = cuda.grid(1)
    n = is_first.shape[0]
    if pos >= n or is_first[pos] == 0:
        return
    x = id_at(dense_ids, lexical_ids, pos)
    s = score[pos]
    rank = 0
    for j in range(n):
        if is_first[j] != 0 and j != pos:
            sj = score[j]
            if sj > s or (sj == s and id_at(dense_ids, lexical_ids, j) < x):
                rank += 1
    if rank < k:
        out_ids[rank] = x
        out_scores[rank] = s
        out_dr[rank] = dr[pos]
        out_lr[rank] = lr[pos]


# -- top-k: one thread per query row -------------------------------------------------------------------
TOPK_THREADS = 64


@cuda.jit
def topk_kernel(scores, rows, best_scores, best_rows):  # pragma: no cover - compiled
    # the CPU kernel's insertion into a sorted list of k, kept in the output row (global memory)
    q = cuda.grid(1)
    queries, n = scores.shape
    if q >= queries:
        return
    k = best_scores.shape[1]
    rq = q if rows.shape[0] == queries else 0
    count = 0
    for j in range(n):
        score = scores[q, j]
        row = rows[rq, j]
        if count == k:
            if not score >= best_scores[q, k - 1]:
                continue
            if score == best_scores[q, k - 1] and row > best_rows[q, k - 1]:
                continue
            pos = k - 1
        else:
            pos = count
            count += 1
        while pos > 0 and (best_scores[q, pos - 1] < score or (best_scores[q, pos - 1] == score and best_rows[q, pos - 1] > row)):
            best_scores[q, pos] = best_scores[q, pos - 1]
            best_rows[q, pos] = best_rows[q, pos - 1]
            pos -= 1
        best_scores[q, pos] = score
        best_rows[q, pos] = row
