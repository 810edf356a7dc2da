"""Calibration-free k-means: Lloyd iterations in torch, with fasq's C++ kernel (:mod:`fasq.fit.native`)
doing the assignment and the per-centroid sums on the CPU; faiss on the CPU where that kernel does not
build and faiss is installed.

Both are deterministic for a given seed and thread count.
"""
from __future__ import annotations

import functools
import logging

import torch

from .native import lloyd_stats, nearest
from .native import module as native_module

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
        return True
    except Exception:
        return False


def choose_backend(backend: str, device: torch.device) -> str:
    """"auto": fasq's own Lloyd iterations ("torch") where its C++ kernel runs (CPU), else faiss when
    installed (CPU), else torch."""
    if backend == "auto":
        if device.type != "cpu" or native_module() is not None:
            return "torch"
        return "faiss" if _have_faiss() else "torch"
    if backend == "faiss" and not _have_faiss():
        raise ValueError("kmeans_backend='faiss' but faiss is not installed: `pip install faiss-cpu`, "
                         "or use kmeans_backend='torch'")
    return backend


def _sample(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    idx = torch.randperm(x.shape[0], generator=gen)[:n].to(x.device)
    return x[idx]


def sample_indices(n_total: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` distinct indices of ``range(n_total)`` drawn with ``gen``, sorted (int64 [n]); all of them,
    drawing nothing, when ``n_total <= n``.  Memory O(n), not O(n_total) as ``randperm(n_total)``: this is
    how a blocked fit (:mod:`fasq.fit.pq`) samples the sub-vectors of a table it never holds whole."""
    if n_total <= n:
        return torch.arange(n_total)
    if n_total <= 4 * n:
        return torch.randperm(n_total, generator=gen)[:n].sort().values
    picked = torch.empty(0, dtype=torch.int64)
    while picked.numel() < n:   # rejection of repeats: a round or two at n_total > 4n
        more = torch.randint(n_total, (n - picked.numel(),), generator=gen)
        picked = torch.cat([picked, more]).unique()
    return picked


def assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Index of the nearest centroid for each row of x. x: [N, d], centroids: [K, d] -> [N] int64.

    On the CPU: fasq's own kernel (:mod:`fasq.fit.native`), else faiss, else torch."""
    out = nearest(x, centroids)
    if out is not None:
        return out
    if x.device.type == "cpu" and _have_faiss():
        return _faiss_assign(x, centroids)
    c2 = (centroids * centroids).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    # Keep the distance block within ~256 MB.
    chunk = max(1024, min(chunk, (1 << 26) // max(1, centroids.shape[0])))
    for s in range(0, x.shape[0], chunk):
        xb = x[s: s + chunk]
        dist = c2[None, :] - 2.0 * (xb @ centroids.T)
        out[s: s + chunk] = dist.argmin(1)
    return out


def _faiss_assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    # faiss fuses distance and argmin (BLAS + blocked reduction): 25-70x faster than torch here.
    import faiss
    import numpy as np

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids.float().numpy()))
    _, ids = index.search(np.ascontiguousarray(x.float().numpy()), 1)
    return torch.from_numpy(ids[:, 0].astype(np.int64))


def _kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on (a sample of) x."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    cent = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    # Greedy batches: pick several centres per distance update when k is large (keeps it O(n*k)).
    while len(cent) < k:
        m = min(k - len(cent), max(1, k // 64))
        p = d2.clamp_min(0).double().cpu()
        if float(p.sum()) <= 0:
            idx = torch.randint(n, (m,), generator=gen)
        else:
            idx = torch.multinomial(p, m, replacement=False, generator=gen)
        new = x[idx.to(x.device)]
        cent.extend(new)
        dn = torch.cdist(x, new).pow(2).min(1).values
        d2 = torch.minimum(d2, dn)
    return torch.stack(cent[:k])


def _torch_kmeans(x: torch.Tensor, k: int, iters: int, init: str, gen: torch.Generator) -> torch.Tensor:
    if init == "kmeans++":
        cent = _kmeanspp(_sample(x, 32 * k, gen), k, gen)
    else:
        cent = x[torch.randperm(x.shape[0], generator=gen)[:k].to(x.device)].clone()
    for _ in range(iters):
        stats = lloyd_stats(x, cent)
        if stats is not None:  # C++: codes, sums and counts in one pass
            a, sums, cnt = stats
            sums, cnt = sums.to(x.dtype), cnt.to(x.dtype)
        else:
            a = assign(x, cent)
            sums = torch.zeros_like(cent).index_add_(0, a, x)
            cnt = torch.bincount(a, minlength=k).to(x.dtype)
        empty = cnt == 0
        cent = torch.where(empty[:, None], cent, sums / cnt.clamp_min(1)[:, None])
        if bool(empty.any()):  # re-seed empty clusters at random points
            ne = int(empty.sum())
            cent[empty] = x[torch.randint(x.shape[0], (ne,), generator=gen).to(x.device)]
    return cent


def _faiss_kmeans(x: torch.Tensor, k: int, iters: int, init: str, seed: int) -> torch.Tensor:
    import faiss
    import numpy as np

    xn = np.ascontiguousarray(x.detach().cpu().numpy().astype(np.float32))
    d = xn.shape[1]
    km = faiss.Kmeans(d, k, niter=iters, seed=seed, verbose=False, max_points_per_centroid=1 << 30,
                      min_points_per_centroid=1, spherical=False)
    init_c = None
    if init == "kmeans++":
        gen = torch.Generator().manual_seed(seed)
        init_c = _kmeanspp(_sample(x.detach().float().cpu(), 32 * k, gen), k, gen).numpy().astype(np.float32)
    km.train(xn, init_centroids=init_c)
    return torch.from_numpy(km.centroids.copy()).to(x.device)


def few_distinct(x: torch.Tensor, k: int) -> torch.Tensor | None:
    """When ``x`` [N, d] has no more distinct rows than ``k`` (checked only for N <= 4k): those rows,
    repeated to k, as the centroids; else None."""
    uniq = torch.unique(x, dim=0) if x.shape[0] <= 4 * k else None
    if uniq is not None and uniq.shape[0] <= k:
        return uniq[torch.arange(k) % uniq.shape[0]]
    return None


def train_centroids(train: torch.Tensor, k: int, *, iters: int, init: str, seed: int, backend: str,
                    gen: torch.Generator) -> torch.Tensor:
    """Centroids [k, d] fitted on ``train`` [n, d] (already sampled); ``gen`` continues the sampling's
    generator (k-means++ seeding, re-seeding of empty clusters)."""
    if choose_backend(backend, train.device) == "faiss":
        return _faiss_kmeans(train, k, iters, init, seed)
    return _torch_kmeans(train, k, iters, init, gen)


def kmeans(x: torch.Tensor, k: int, *, iters: int = 25, init: str = "kmeans++", seed: int = 0,
           backend: str = "auto", max_points: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the rows of ``x`` [N, d] into k centroids; returns (centroids [k, d], codes [N]).

    Trains on at most ``max_points`` rows sampled with ``seed``; assigns every row.  When there are
    no more distinct rows than ``k``, the rows themselves are the centroids (padded by repetition).
    """
    x = x.float()
    gen = torch.Generator().manual_seed(seed)
    reps = few_distinct(x, k)
    if reps is not None:
        return reps, assign(x, reps)
    train = _sample(x, max(max_points, k), gen)
    cent = train_centroids(train, k, iters=iters, init=init, seed=seed, backend=backend, gen=gen)
    return cent, assign(x, cent)
