"""The C++ nearest-centroid kernel used by k-means (fasq.fit.native) against plain torch."""
import pytest
import torch

from fasq.fit import kmeans as km
from fasq.fit import native


def _torch_nearest(x, c):
    return torch.cdist(x.double(), c.double()).argmin(1)


needs_kernel = pytest.mark.skipif(native.module() is None, reason="the k-means C++ kernel did not build here")


@needs_kernel
@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("k", [2, 17, 256, 1024])
@pytest.mark.parametrize("n", [1, 63, 1000])
def test_nearest_matches_exhaustive_search(d, k, n):
    gen = torch.Generator().manual_seed(d * 7919 + k * 31 + n)
    x = torch.randn(n, d, generator=gen)
    c = torch.randn(k, d, generator=gen)
    got = native.nearest(x, c)
    want = _torch_nearest(x, c)
    assert got.dtype == torch.int64 and got.shape == (n,)
    assert int(got.min()) >= 0 and int(got.max()) < k
    # Same centroid, or one at the same distance up to fp32 rounding (a near-tie).
    dg = ((x.double() - c.double()[got]) ** 2).sum(1)
    dw = ((x.double() - c.double()[want]) ** 2).sum(1)
    assert torch.allclose(dg, dw, rtol=1e-5, atol=1e-6)
    assert (got == want).float().mean() > 0.99


@needs_kernel
def test_ties_pick_the_lowest_index():
    c = torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.0, 1.0]])
    x = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert native.nearest(x, c).tolist() == [0, 0]


def test_declines_where_it_does_not_apply():
    assert native.nearest(torch.randn(4, 9), torch.randn(3, 9)) is None  # d > 8


def test_assign_falls_back_without_the_kernel(monkeypatch):
    monkeypatch.setattr(km, "nearest", lambda x, c: None)
    gen = torch.Generator().manual_seed(0)
    x, c = torch.randn(500, 2, generator=gen), torch.randn(16, 2, generator=gen)
    assert torch.equal(km.assign(x, c), _torch_nearest(x, c))


@needs_kernel
@pytest.mark.parametrize("d,k", [(1, 16), (2, 256), (3, 7)])
def test_lloyd_stats_are_sums_and_counts_of_the_assignment(d, k):
    gen = torch.Generator().manual_seed(d + k)
    x, c = torch.randn(5000, d, generator=gen), torch.randn(k, d, generator=gen)
    codes, sums, counts = native.lloyd_stats(x, c)
    assert torch.equal(codes, native.nearest(x, c))
    want_sums = torch.zeros(k, d, dtype=torch.float64).index_add_(0, codes, x.double())
    assert torch.allclose(sums, want_sums, atol=1e-9)
    assert torch.equal(counts, torch.bincount(codes, minlength=k).double())


def test_own_kmeans_is_deterministic_and_converges():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20000, 2, generator=gen)
    c1, a1 = km.kmeans(x, 64, seed=5, backend="torch")
    c2, a2 = km.kmeans(x, 64, seed=5, backend="torch")
    assert torch.equal(c1, c2) and torch.equal(a1, a2)
    # Lloyd never increases the error: 25 iterations beat 1.
    c0, a0 = km.kmeans(x, 64, seed=5, backend="torch", iters=1)
    assert ((x - c1[a1]) ** 2).sum() < ((x - c0[a0]) ** 2).sum()


def test_every_cpp_source_ships_in_the_package():
    """A C++ source missing from package-data builds in a checkout but not from an installed wheel."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["fasq"]
    pkg = root / "src" / "fasq"
    sources = [p.relative_to(pkg).as_posix() for ext in ("*.cpp", "*.cu") for p in pkg.rglob(ext)]
    assert sources
    for src in sources:
        assert any(fnmatch.fnmatch(src, g) for g in globs), f"{src} is not in pyproject's package-data"
