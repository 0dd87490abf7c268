"""Tests for satlib.ib: closed forms against scipy, numerical integration and Monte Carlo."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from scipy.special import logsumexp

from satlib import ib

LOG_2PI = math.log(2 * math.pi)


def random_spd(rng, K, log10_scale=(0.0, 0.0)):
    """A random SPD matrix with per-dimension scales spread over the given decades."""
    A = rng.normal(size=(K, K))
    S = A @ A.T + 0.05 * K * np.eye(K)
    d = 10.0 ** rng.uniform(*log10_scale, size=K)
    return d[:, None] * S * d[None, :]


def mixture_logpdf(x, weights, means, covs):
    comps = [
        math.log(w) + scipy.stats.multivariate_normal(m, c).logpdf(x)
        for w, m, c in zip(weights, means, covs)
    ]
    return logsumexp(np.stack(comps), axis=0)


def sample_mixture(rng, n, weights, means, covs):
    idx = rng.choice(len(weights), size=n, p=weights)
    out = np.empty((n, means.shape[1]))
    for k in range(len(weights)):
        sel = idx == k
        out[sel] = rng.multivariate_normal(means[k], covs[k], size=sel.sum())
    return out


# ---------------------------------------------------------------------------
# Gaussian entropy and bounds
# ---------------------------------------------------------------------------


def test_gaussian_entropy_matches_scipy():
    rng = np.random.default_rng(0)
    for K in range(1, 7):
        for _ in range(5):
            S = random_spd(rng, K, (-1.5, 1.5))
            expected = scipy.stats.multivariate_normal(np.zeros(K), S).entropy()
            assert ib.gaussian_entropy(S) == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_gaussian_entropy_matches_monte_carlo():
    rng = np.random.default_rng(1)
    for K in (2, 4):
        S = random_spd(rng, K, (-1.0, 1.0))
        dist = scipy.stats.multivariate_normal(rng.normal(size=K), S)
        logp = dist.logpdf(dist.rvs(size=200_000, random_state=rng))
        se = logp.std() / math.sqrt(len(logp))
        assert abs(ib.gaussian_entropy(S) - (-logp.mean())) < 5 * se


def test_gaussian_entropy_torch_and_batched():
    rng = np.random.default_rng(2)
    covs = np.stack([random_spd(rng, 3) for _ in range(4)])
    batched = ib.gaussian_entropy(covs)
    assert isinstance(batched, np.ndarray) and batched.shape == (4,)
    singles = [ib.gaussian_entropy(torch.tensor(c, dtype=torch.float32)) for c in covs]
    assert all(isinstance(v, float) for v in singles)
    np.testing.assert_allclose(batched, singles, rtol=1e-5)
    for fn in (ib.paper_entropy_bound, ib.tight_entropy_bound, ib.hadamard_entropy_bound):
        np.testing.assert_allclose(fn(covs), [fn(torch.from_numpy(c)) for c in covs], rtol=1e-12)


def test_gaussian_entropy_rejects_bad_covariances():
    with pytest.raises(ValueError, match="positive definite"):
        ib.gaussian_entropy(np.array([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="positive definite"):
        ib.gaussian_entropy(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="symmetric"):
        ib.gaussian_entropy(np.array([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        ib.gaussian_entropy(np.ones((2, 3)))


def test_entropy_bound_chain_on_random_covariances():
    """exact <= Hadamard <= tight <= paper, for small, large and mixed variances (notes E3)."""
    rng = np.random.default_rng(3)
    for scales in [(-3, -1), (-1, 1), (1, 3), (-3, 3)]:
        for K in (1, 2, 5, 10):
            for _ in range(10):
                S = random_spd(rng, K, scales)
                exact = ib.gaussian_entropy(S)
                had = ib.hadamard_entropy_bound(S)
                tight = ib.tight_entropy_bound(S)
                paper = ib.paper_entropy_bound(S)
                assert exact <= had + 1e-9
                assert had <= tight + 1e-9
                assert tight < paper
                assert paper - tight == pytest.approx(0.5 * K * LOG_2PI)


def test_tight_bound_attained_only_at_identity():
    for K in (1, 3, 8):
        eye = np.eye(K)
        assert ib.tight_entropy_bound(eye) == pytest.approx(ib.gaussian_entropy(eye), abs=1e-12)
        assert ib.hadamard_entropy_bound(eye) == pytest.approx(ib.gaussian_entropy(eye), abs=1e-12)
        # any departure from the identity makes the bound strict
        for c in (0.5, 0.9, 1.1, 2.0):
            assert ib.tight_entropy_bound(c * eye) > ib.gaussian_entropy(c * eye) + 1e-6
        if K > 1:
            corr = eye.copy()
            corr[0, 1] = corr[1, 0] = 0.3
            assert ib.tight_entropy_bound(corr) > ib.gaussian_entropy(corr) + 1e-6
    # the paper's version is never attained, not even at the identity
    assert ib.paper_entropy_bound(np.eye(2)) > ib.gaussian_entropy(np.eye(2)) + 1.0


def test_hadamard_bound_exact_for_diagonal():
    D = np.diag([0.01, 3.0, 40.0])
    assert ib.hadamard_entropy_bound(D) == pytest.approx(ib.gaussian_entropy(D), abs=1e-12)


# ---------------------------------------------------------------------------
# overlaps and Renyi-2
# ---------------------------------------------------------------------------

MU_I = np.array([0.3, -0.2])
S_I = np.array([[0.5, 0.2], [0.2, 0.4]])
MU_J = np.array([-0.4, 0.6])
S_J = np.array([[0.3, -0.1], [-0.1, 0.6]])


def test_gaussian_overlap_matches_grid_integration():
    g = np.linspace(-7, 7, 701)
    X, Y = np.meshgrid(g, g, indexing="ij")
    pts = np.stack([X.ravel(), Y.ravel()], axis=1)
    pi = scipy.stats.multivariate_normal(MU_I, S_I).pdf(pts)
    pj = scipy.stats.multivariate_normal(MU_J, S_J).pdf(pts)
    numeric = np.sum(pi * pj) * (g[1] - g[0]) ** 2
    assert ib.gaussian_overlap(MU_I, S_I, MU_J, S_J) == pytest.approx(numeric, rel=1e-8)


def test_gaussian_overlap_matches_monte_carlo():
    rng = np.random.default_rng(4)
    t = rng.multivariate_normal(MU_I, S_I, size=200_000)
    vals = scipy.stats.multivariate_normal(MU_J, S_J).pdf(t)
    se = vals.std() / math.sqrt(len(vals))
    closed = ib.gaussian_overlap(MU_I, S_I, MU_J, S_J)
    assert abs(closed - vals.mean()) < 5 * se
    # symmetric in its two arguments, and torch inputs work
    assert ib.gaussian_overlap(MU_J, S_J, MU_I, S_I) == pytest.approx(closed, rel=1e-12)
    tt = [torch.from_numpy(a) for a in (MU_I, S_I, MU_J, S_J)]
    assert ib.gaussian_overlap(*tt) == pytest.approx(closed, rel=1e-12)


def test_gaussian_overlap_decreases_as_means_separate():
    direction = np.array([0.6, 0.8])
    dists = np.linspace(0.0, 8.0, 41)
    ov = ib.gaussian_overlap(MU_I[None] + dists[:, None] * direction, S_I, MU_I, S_J)
    assert ov.shape == (41,)
    assert np.all(np.diff(ov) < 0)
    # log-domain version stays finite where the overlap itself underflows
    far = ib.log_gaussian_overlap(np.array([1e3, 0.0]), 1e-4 * np.eye(2), np.zeros(2), 1e-4 * np.eye(2))
    assert ib.gaussian_overlap(np.array([1e3, 0.0]), 1e-4 * np.eye(2), np.zeros(2), 1e-4 * np.eye(2)) == 0.0
    assert far == pytest.approx(-LOG_2PI - math.log(2e-4) - 1e6 / (2 * 2e-4), rel=1e-12)


MIX_W = np.array([0.5, 0.3, 0.2])
MIX_MU = np.array([[0.0, 0.0], [1.5, 0.5], [-1.0, 1.2]])
MIX_S = np.array([
    [[0.3, 0.1], [0.1, 0.2]],
    [[0.2, 0.0], [0.0, 0.5]],
    [[0.4, -0.15], [-0.15, 0.3]],
])


def test_renyi2_of_mixture_matches_monte_carlo_and_is_below_shannon():
    rng = np.random.default_rng(5)
    x = sample_mixture(rng, 200_000, MIX_W, MIX_MU, MIX_S)
    logp = mixture_logpdf(x, MIX_W, MIX_MU, MIX_S)
    p = np.exp(logp)
    mc_collision = p.mean()
    se = p.std() / math.sqrt(len(p))
    h2 = ib.renyi2_entropy_mixture(MIX_W, MIX_MU, MIX_S)
    assert abs(math.exp(-h2) - mc_collision) < 5 * se
    shannon = -logp.mean()
    assert h2 < shannon - 0.05
    # torch inputs and unnormalised weights give the same value
    assert ib.renyi2_entropy_mixture(
        torch.tensor(2 * MIX_W), torch.tensor(MIX_MU), torch.tensor(MIX_S)
    ) == pytest.approx(h2, rel=1e-12)


def test_renyi2_of_single_gaussian_and_self_overlap():
    S = np.array([[0.7, 0.2], [0.2, 0.3]])
    h2 = ib.renyi2_entropy_mixture([1.0], [[0.5, 0.5]], [S])
    assert h2 == pytest.approx(-math.log(ib.gaussian_self_overlap(S)), rel=1e-12)
    assert ib.gaussian_self_overlap(S) == pytest.approx(ib.gaussian_overlap(np.zeros(2), S, np.zeros(2), S))
    assert h2 < ib.gaussian_entropy(S)


def test_narrow_gaussian_has_self_overlap_above_one():
    """The appendix's step int p^2 <= 1 fails for densities (notes E7)."""
    s, K = 0.1, 2
    cov = s**2 * np.eye(K)
    closed = ib.gaussian_self_overlap(cov)
    assert closed == pytest.approx((2 * s * math.sqrt(math.pi)) ** -K, rel=1e-12)
    assert closed > 1.0
    rng = np.random.default_rng(6)
    dist = scipy.stats.multivariate_normal(np.zeros(K), cov)
    vals = dist.pdf(dist.rvs(size=200_000, random_state=rng))
    assert abs(vals.mean() - closed) < 5 * vals.std() / math.sqrt(len(vals))
    assert vals.mean() > 1.0


def test_mixture_entropy_mc_matches_closed_form_and_numerical_integration():
    # a single Gaussian: the closed form
    S = np.array([[0.6, 0.25], [0.25, 0.4]])
    est = ib.gaussian_mixture_entropy_mc([1.0], [[1.0, -2.0]], [S], n=100_000, seed=1)
    assert abs(est.value - ib.gaussian_entropy(S)) < 5 * est.stderr
    # a 1-D mixture: quadrature of -p log p on a fine grid (independent of the sampler)
    w, mu, var = np.array([0.2, 0.5, 0.3]), np.array([-2.0, 0.5, 3.0]), np.array([0.3, 1.0, 0.05])
    g = np.linspace(-12, 12, 200_001)
    p = sum(wk * scipy.stats.norm(m, math.sqrt(v)).pdf(g) for wk, m, v in zip(w, mu, var))
    numeric = -np.sum(scipy.special.xlogy(p, p)) * (g[1] - g[0])
    est = ib.gaussian_mixture_entropy_mc(w, mu[:, None], var[:, None, None], n=200_000, seed=2)
    assert abs(est.value - numeric) < 5 * est.stderr
    # seeded: the same seed gives the same number
    again = ib.gaussian_mixture_entropy_mc(w, mu[:, None], var[:, None, None], n=200_000, seed=2)
    assert again == est
    with pytest.raises(ValueError):
        ib.gaussian_mixture_entropy_mc([1.0], [[0.0]], [[[1.0]]], n=1)


def test_mixture_entropy_between_renyi2_and_gaussian_max_entropy():
    """Renyi-2 <= Shannon <= entropy of the Gaussian with the same covariance (Proposition 1)."""
    rng = np.random.default_rng(21)
    for _ in range(5):
        M, K = rng.integers(2, 5), rng.integers(1, 4)
        w = rng.dirichlet(np.ones(M))
        mu = rng.normal(scale=2.0, size=(M, K))
        covs = np.stack([random_spd(rng, K, (-1.0, 0.0)) for _ in range(M)])
        mean = w @ mu
        cov = np.einsum("m,mij->ij", w, covs) + np.einsum("m,mi,mj->ij", w, mu - mean, mu - mean)
        est = ib.gaussian_mixture_entropy_mc(w, mu, covs, n=50_000, seed=int(rng.integers(1 << 30)))
        assert ib.renyi2_entropy_mixture(w, mu, covs) < est.value + 5 * est.stderr
        assert est.value - 5 * est.stderr < ib.gaussian_entropy(cov)


def test_ib_loss_upper_bound_mixture_holds_against_monte_carlo():
    rng = np.random.default_rng(22)
    for case in range(8):
        C, K = rng.integers(2, 5), rng.integers(1, 4)
        w = rng.dirichlet(np.ones(C))
        mu = rng.normal(scale=rng.uniform(0.1, 3.0), size=(C, K))
        covs = np.stack([random_spd(rng, K, (-1.5, 0.5)) for _ in range(C)])
        est = ib.gaussian_mixture_entropy_mc(w, mu, covs, n=40_000, seed=case)
        h_t_given_y = float(np.sum(w * ib.gaussian_entropy(covs)))
        for gamma in (1.0, 1.5, 4.0):
            loss_hi = (1 - gamma) * (est.value - 5 * est.stderr) + gamma * h_t_given_y
            b = ib.ib_loss_upper_bound_mixture(w, mu, covs, gamma)
            assert loss_hi <= b.bound + 1e-9
            assert b.bound <= b.linear_bound + 1e-12
        assert b.collision == pytest.approx(math.exp(-ib.renyi2_entropy_mixture(w, mu, covs)), rel=1e-10)
        assert b.self_term == pytest.approx(float(np.sum(w**2 * ib.gaussian_self_overlap(covs))), rel=1e-10)
        cross = 2 * sum(w[i] * w[j] * ib.gaussian_overlap(mu[i], covs[i], mu[j], covs[j])
                        for i in range(C) for j in range(i + 1, C))
        assert b.cross_term == pytest.approx(cross, rel=1e-10, abs=1e-300)
        assert b.conditional_entropy_bound == pytest.approx(
            float(np.sum(w * ib.tight_entropy_bound(covs))), rel=1e-12)
    with pytest.raises(ValueError, match="gamma"):
        ib.ib_loss_upper_bound_mixture(w, mu, covs, 0.5)


def test_appendix_lower_bound_on_H_T_fails_for_tight_clusters():
    """The appendix claims H(T) >= 1 - |Y| - 2 sum_{i<j} int p_i p_j (from int p_i^2 <= 1; notes E7)."""
    C, K, s = 2, 1, 0.01
    mu = np.array([[-1.0], [1.0]])
    covs = np.full((C, K, K), s**2)
    claimed = 1 - C - 2 * ib.gaussian_overlap(mu[0], covs[0], mu[1], covs[1])
    est = ib.gaussian_mixture_entropy_mc([0.5, 0.5], mu, covs, n=50_000)
    assert est.value + 5 * est.stderr < claimed
    # the sound chain H >= H_2 >= 1 - int p^2 holds
    b = ib.ib_loss_upper_bound_mixture([0.5, 0.5], mu, covs, 2.0)
    assert 1 - b.collision <= ib.renyi2_entropy_mixture([0.5, 0.5], mu, covs) <= est.value + 5 * est.stderr


# ---------------------------------------------------------------------------
# discrete IB loss (notes E2)
# ---------------------------------------------------------------------------


def random_joint(rng, n_t, p_y):
    """Random p(t, y) = p(y) p(t | y) with the given label marginal."""
    cond = rng.dirichlet(0.5 * np.ones(n_t), size=len(p_y)).T  # [n_t, n_y]
    return cond * p_y[None, :]


def test_discrete_entropies_known_cases():
    p_t, p_y = np.array([0.2, 0.8]), np.array([0.5, 0.25, 0.25])
    e = ib.discrete_entropies(np.outer(p_t, p_y))
    assert e.I_T_Y == pytest.approx(0.0, abs=1e-12)
    assert e.H_T_given_Y == pytest.approx(e.H_T)
    assert e.H_Y == pytest.approx(1.5 * math.log(2))
    # counts are normalised; T = Y gives I = H(Y), H(T|Y) = 0
    e = ib.discrete_entropies(np.diag([10, 20, 30]))
    assert e.I_T_Y == pytest.approx(e.H_Y) and e.H_T_given_Y == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        ib.discrete_entropies(np.array([[0.5, -0.1], [0.3, 0.3]]))


def test_ib_loss_forms_agree_on_random_tables():
    rng = np.random.default_rng(7)
    for _ in range(200):
        n_t, n_y = rng.integers(1, 8), rng.integers(1, 6)
        joint = rng.dirichlet(np.ones(n_t * n_y)).reshape(n_t, n_y)
        gamma = rng.uniform(0.05, 5.0)
        assert ib.ib_loss(joint, gamma) == pytest.approx(ib.ib_loss_decomposed(joint, gamma), abs=1e-12)
    with pytest.raises(ValueError):
        ib.ib_loss(np.eye(2) / 2, 0.0)


def test_ib_minimum_for_gamma_below_one_is_constant_T():
    rng = np.random.default_rng(8)
    p_y = rng.dirichlet(np.ones(4))
    constant_T = p_y[None, :]  # a single value of T
    for gamma in (0.1, 0.5, 0.99):
        assert ib.ib_loss(constant_T, gamma) == pytest.approx(0.0, abs=1e-12)
        for _ in range(100):
            joint = random_joint(rng, rng.integers(1, 10), p_y)
            assert ib.ib_loss(joint, gamma) >= -1e-12
        # T = Y is strictly worse when gamma < 1
        assert ib.ib_loss(np.diag(p_y), gamma) > 1e-3


def test_ib_minimum_for_gamma_one_is_any_function_of_Y():
    p_y = np.array([0.1, 0.2, 0.3, 0.4])
    merge = np.array([[0.1, 0.2, 0.0, 0.0], [0.0, 0.0, 0.3, 0.4]])  # T = [y >= 2]
    for joint in (p_y[None, :], np.diag(p_y), merge):
        assert ib.ib_loss(joint, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_ib_minimum_for_gamma_above_one_is_injective_T():
    rng = np.random.default_rng(9)
    p_y = rng.dirichlet(np.ones(5))
    H_Y = ib.discrete_entropies(p_y[None, :]).H_Y
    relabel = np.zeros((7, 5))
    relabel[rng.permutation(7)[:5], np.arange(5)] = p_y  # injective, not the identity
    for gamma in (1.01, 2.0, 10.0):
        floor = (1 - gamma) * H_Y
        assert ib.ib_loss(np.diag(p_y), gamma) == pytest.approx(floor, abs=1e-12)
        assert ib.ib_loss(relabel, gamma) == pytest.approx(floor, abs=1e-12)
        for _ in range(100):
            joint = random_joint(rng, rng.integers(1, 12), p_y)
            assert ib.ib_loss(joint, gamma) >= floor - 1e-12
        # a constant T is strictly worse when gamma > 1
        assert ib.ib_loss(p_y[None, :], gamma) > floor + 1e-3


# ---------------------------------------------------------------------------
# binning estimator
# ---------------------------------------------------------------------------


def test_binned_feature_equal_to_label_recovers_H_Y():
    rng = np.random.default_rng(10)
    y = rng.integers(0, 10, size=5000)
    feats = np.stack([y, y, np.zeros_like(y)], axis=1).astype(float)
    r = ib.binned_entropies(feats, y, n_bins=30)
    H_Y = ib.discrete_entropies(np.bincount(y)[None, :]).H_Y
    assert r.H_Y == pytest.approx(H_Y, abs=1e-12)
    assert r.I_T_Y == pytest.approx(H_Y, abs=1e-12)
    assert r.H_T == pytest.approx(H_Y, abs=1e-12)
    assert r.H_T_given_Y == pytest.approx(0.0, abs=1e-12)
    assert r.n_symbols == 10 and r.n_samples == 5000


def test_binned_independent_features_carry_little_label_information():
    rng = np.random.default_rng(11)
    N = 20_000
    feats = torch.randn(N, 2, generator=torch.Generator().manual_seed(0))
    y = rng.integers(0, 3, size=N)
    r = ib.binned_entropies(feats, y, n_bins=10)
    assert r.I_T_Y < 0.02 * r.H_Y
    assert r.H_T_given_Y <= r.H_T


def test_binned_properties_and_input_types():
    rng = np.random.default_rng(12)
    N = 2000
    y = rng.integers(0, 4, size=N)
    feats = rng.normal(size=(N, 3)) + y[:, None]
    for n_bins in (2, 5, 30, 200):
        r = ib.binned_entropies(feats, y, n_bins=n_bins)
        assert r.H_T_given_Y <= r.H_T + 1e-12
        assert 0.0 <= r.I_T_Y <= r.H_Y + 1e-12
        assert r.H_T <= math.log(N) + 1e-12
        assert r.I_X_T == r.H_T
    a = ib.binned_entropies(feats, y, n_bins=30)
    b = ib.binned_entropies(torch.from_numpy(feats).reshape(N, 3, 1), torch.from_numpy(y), n_bins=30)
    assert a == b
    # label values are arbitrary, and an explicit range clips outliers into the edge bins
    assert ib.binned_entropies(feats, y * 7 + 3, n_bins=30) == a
    r = ib.binned_entropies(feats, y, n_bins=4, range=(-1.0, 1.0))
    assert r.n_symbols <= 4**3
    # a constant feature is a single symbol
    assert ib.binned_entropies(np.ones((10, 2)), np.arange(10) % 2).H_T == 0.0


# ---------------------------------------------------------------------------
# noise-added (pairwise-distance) estimators
# ---------------------------------------------------------------------------


def mc_noisy_mixture_entropy(rng, t, s, n=200_000):
    """Monte Carlo entropy of (1/N) sum_i N(t_i, s I), with its standard error."""
    N, K = t.shape
    x = t[rng.integers(0, N, size=n)] + math.sqrt(s) * rng.normal(size=(n, K))
    d2 = torch.cdist(torch.from_numpy(x), torch.from_numpy(t)).pow(2).numpy()
    logp = logsumexp(-d2 / (2 * s), axis=1) - math.log(N) - 0.5 * K * math.log(2 * math.pi * s)
    return -logp.mean(), logp.std() / math.sqrt(n)


@pytest.mark.parametrize("N,K,s", [(40, 1, 0.05), (50, 2, 0.1), (40, 2, 1.0), (30, 3, 0.3)])
def test_kde_bounds_bracket_monte_carlo_entropy(N, K, s):
    rng = np.random.default_rng(13 + N + K)
    t = rng.normal(size=(N, K))
    t[: N // 2] += 3.0  # two clusters of points
    true_h, se = mc_noisy_mixture_entropy(rng, t, s)
    upper = ib.kde_entropy_upper(t, s)
    lower = ib.kde_entropy_lower(t, s)
    assert lower - 5 * se <= true_h <= upper + 5 * se
    # reasonably close: the KL bound overshoots by less than K/2 nats here
    assert upper - true_h < 0.5 * K
    assert true_h - lower < 0.5 * K


def test_kde_bounds_are_exact_in_the_two_limits():
    K, s, N = 3, 0.2, 25
    h_noise = 0.5 * K * math.log(2 * math.pi * math.e * s)
    same = np.ones((N, K))
    assert ib.kde_entropy_upper(same, s) == pytest.approx(h_noise, abs=1e-12)
    assert ib.kde_entropy_lower(same, s) == pytest.approx(h_noise, abs=1e-12)
    far = 1e3 * np.arange(N)[:, None] * np.ones((1, K))
    assert ib.kde_entropy_upper(far, s) == pytest.approx(h_noise + math.log(N), abs=1e-12)
    assert ib.kde_entropy_lower(far, s) == pytest.approx(h_noise + math.log(N), abs=1e-12)


def test_kde_chunking_does_not_change_the_result():
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = ib.estimators._mean_log_kernel_mean(x, 0.7)
    chunked = ib.estimators._mean_log_kernel_mean(x, 0.7, max_chunk_bytes=8 * 300 * 7)  # 7 rows at a time
    assert chunked == pytest.approx(full, rel=1e-12)


def test_kde_conditional_entropy_and_information():
    rng = np.random.default_rng(14)
    N, s = 600, 0.05
    y = rng.integers(0, 3, size=N)
    centres = np.array([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])
    feats = centres[y] + rng.normal(size=(N, 2))
    info = ib.kde_mutual_information(torch.from_numpy(feats).float(), torch.from_numpy(y), s)
    H_Y = ib.discrete_entropies(np.bincount(y)[None, :]).H_Y
    assert info.H_T_given_Y <= info.H_T
    assert info.I_T_Y == pytest.approx(H_Y, abs=1e-4)  # classes far apart: T + Z reveals Y
    assert info.H_T_given_Y == pytest.approx(ib.kde_conditional_entropy_upper(feats, y, s), abs=1e-5)
    assert info.H_noise == pytest.approx(math.log(2 * math.pi * math.e * s))
    assert 0.0 <= info.I_X_T <= math.log(N) + 1e-9
    # labels independent of the features: little information once the noise blurs the
    # points within a cluster (noise 4 is still tiny against the class separation) ...
    shuffled = rng.permutation(y)
    assert ib.kde_mutual_information(feats, shuffled, 4.0).I_T_Y < 0.02 * H_Y
    assert ib.kde_mutual_information(feats, y, 4.0).I_T_Y == pytest.approx(H_Y, abs=1e-4)
    # ... but with noise far below the spacing of the points every sample is its own
    # symbol, and even random labels look fully informative
    assert ib.kde_mutual_information(feats, shuffled, 1e-4).I_T_Y > 0.95 * H_Y


def test_kde_conditional_lower_bound_below_upper_and_gaussian_bound():
    rng = np.random.default_rng(23)
    N, K, s = 300, 3, 0.2
    y = rng.integers(0, 4, size=N)
    feats = rng.normal(size=(N, K)) * rng.uniform(0.3, 2.0, size=K) + 2.0 * y[:, None]
    lo = ib.kde_conditional_entropy_lower(feats, y, s)
    hi = ib.kde_conditional_entropy_upper(feats, y, s)
    assert lo <= hi
    # each class's empirical mixture has covariance (class covariance, denominator n_i) + s I,
    # so Proposition 1 bounds its entropy, which the KDE lower bound does not exceed
    gauss = 0.0
    for c in range(4):
        xc = feats[y == c]
        cov = np.cov(xc, rowvar=False, bias=True) + s * np.eye(K)
        gauss += len(xc) / N * ib.gaussian_entropy(cov)
    assert lo <= gauss
    # a single class: identical to the unconditional bound
    assert ib.kde_conditional_entropy_lower(feats, np.zeros(N), s) == pytest.approx(ib.kde_entropy_lower(feats, s))


def test_class_spread_matches_numpy_and_cluster_loss():
    from satlib.training import cluster_loss

    rng = np.random.default_rng(24)
    N, K, C = 200, 6, 4
    y = rng.integers(0, C, size=N)
    feats = rng.normal(size=(N, K)) * rng.uniform(0.1, 3.0, size=(C, K))[y] + rng.normal(size=(C, K))[y]
    sp = ib.class_spread(torch.from_numpy(feats), torch.from_numpy(y))
    for c in range(C):
        var = feats[y == c].var(axis=0)  # ddof 0, as the loss
        assert sp.weights[c] == pytest.approx(np.mean(y == c))
        assert sp.traces[c] == pytest.approx(var.sum(), rel=1e-12)
        assert sp.std_sums[c] == pytest.approx(np.sqrt(var).sum(), rel=1e-12)
        assert sp.log_var_sums[c] == pytest.approx(np.log(var).sum(), rel=1e-12)
    assert sp.dim == K
    assert sp.total_trace == pytest.approx(feats.var(axis=0).sum(), rel=1e-12)
    assert 0 < sp.within_fraction < 1
    # L_Cluster (Eq. 8) of the training code on the same batch, one layer, no epsilon
    loss = cluster_loss([torch.from_numpy(feats).float()], torch.from_numpy(y), C, eps=0.0)
    assert sp.l_cluster == pytest.approx(loss.item(), rel=1e-5)


def test_class_spread_bound_chain():
    """H(T|Y) of the Gaussian with the class covariances <= Hadamard <= std <= variance bound."""
    rng = np.random.default_rng(25)
    for _ in range(20):
        N, K, C = 150, int(rng.integers(1, 8)), int(rng.integers(1, 5))
        y = np.arange(N) % C
        mix = rng.normal(size=(K, K)) * rng.uniform(0.05, 2.0)
        feats = rng.normal(size=(N, K)) @ mix + 3.0 * rng.normal(size=(C, K))[y]
        sp = ib.class_spread(feats, y)
        exact = sum(np.mean(y == c) * ib.gaussian_entropy(np.cov(feats[y == c], rowvar=False, bias=True).reshape(K, K))
                    for c in range(C))
        assert exact <= sp.hadamard_bound + 1e-9
        assert sp.hadamard_bound <= sp.std_bound + 1e-9
        assert sp.std_bound <= sp.variance_bound + 1e-9
        # Cauchy-Schwarz between the two forms of the spread
        assert np.all(sp.std_sums**2 / K <= sp.traces * (1 + 1e-12))
        assert np.all(sp.traces <= sp.std_sums**2 * (1 + 1e-12))


def test_std_sum_can_fall_while_the_trace_rises():
    """L_Cluster's standard-deviation form does not control Proposition 2's variance form."""
    y = np.repeat([0, 1], 4)
    spread_out = np.array([[1, 1, 1, 1], [-1, -1, -1, -1]] * 2, dtype=float)      # sigma_k = 1 in 4 dims
    one_dim = np.array([[2.5, 0, 0, 0], [-2.5, 0, 0, 0]] * 2, dtype=float)          # sigma = 2.5 in 1 dim
    a = ib.class_spread(np.concatenate([spread_out, spread_out + 10]), y)
    b = ib.class_spread(np.concatenate([one_dim, one_dim + 10]), y)
    assert b.l_cluster < a.l_cluster and b.std_bound < a.std_bound
    assert b.variance_bound > a.variance_bound
    assert b.hadamard_bound == -math.inf  # constant dimensions: a degenerate Gaussian


# ---------------------------------------------------------------------------
# constrained Theorem 1 experiment (notes E4)
# ---------------------------------------------------------------------------


def test_objective_overlap_uses_the_closed_form_overlap():
    means = torch.tensor([[0.1, 0.2], [0.5, -0.3], [-0.4, 0.0]], dtype=torch.float64, requires_grad=True)
    variances = torch.tensor([0.1, 0.2, 0.15], dtype=torch.float64, requires_grad=True)
    val = ib.objective_overlap(means, variances, lam=0.0)
    mu, v = means.detach().numpy(), variances.detach().numpy()
    expected = sum(
        ib.gaussian_overlap(mu[i], v[i] * np.eye(2), mu[j], v[j] * np.eye(2))
        for i in range(3) for j in range(i + 1, 3)
    )
    assert val.item() == pytest.approx(expected, rel=1e-12)
    val.backward()
    assert torch.isfinite(means.grad).all() and torch.isfinite(variances.grad).all()
    with torch.no_grad():
        lam_term = ib.objective_overlap(means, variances, 2.0) - ib.objective_overlap(means, variances, 0.0)
        assert lam_term.item() == pytest.approx(2.0 * 2 * v.sum())
        d = ib.objective_distance(means, variances[:, None].expand(3, 2), lam=1.0)
    pair = sum(np.linalg.norm(mu[i] - mu[j]) for i in range(3) for j in range(i + 1, 3))
    assert d.item() == pytest.approx(-pair + 2 * v.sum())


def test_configuration_summary_on_equilateral_triangle():
    ang = np.radians([10.0, 130.0, 250.0])
    mu = 2.0 * np.stack([np.cos(ang), np.sin(ang)], axis=1)
    s = ib.configuration_summary(mu, np.full(3, 0.04), R=2.0, s_min=0.2)
    np.testing.assert_allclose(s["radii"], 2.0)
    np.testing.assert_allclose(s["pairwise_angles_deg"], 120.0)
    np.testing.assert_allclose(s["angular_gaps_deg"], 120.0)
    assert s["radius_error"] < 1e-12 and s["variance_error"] < 1e-12


@pytest.mark.parametrize("objective", ["distance", "overlap"])
@pytest.mark.parametrize("seed", range(5))
def test_theorem1_constrained_optimum(objective, seed):
    R, s_min = 1.0, 0.3
    sol = ib.solve_constrained(objective, C=3, K=2, R=R, s_min=s_min, seed=seed)
    s = ib.configuration_summary(sol.means, sol.variances, R, s_min)
    assert s["radius_error"] < 1e-3
    np.testing.assert_allclose(s["pairwise_angles_deg"], 120.0, atol=2.0)
    np.testing.assert_allclose(s["angular_gaps_deg"], 120.0, atol=2.0)
    assert s["variance_error"] < 1e-4
    assert sol.objective_trace.shape == (1500,)
    assert sol.objective <= sol.objective_trace[0]
    # the random start lies inside the feasible set and away from the optimum
    assert np.all(np.linalg.norm(sol.initial_means, axis=1) <= R + 1e-12)
    assert np.all(sol.initial_variances >= s_min**2)
    assert not np.allclose(sol.initial_means, sol.means, atol=1e-2)


def test_theorem1_solver_accepts_callables_and_diagonal_variances():
    sol = ib.solve_constrained(ib.objective_overlap, C=4, K=2, R=2.0, s_min=0.5, diagonal=True, seed=3)
    assert sol.variances.shape == (4, 2)
    s = ib.configuration_summary(sol.means, sol.variances, 2.0, 0.5)
    assert s["radius_error"] < 1e-3 and s["variance_error"] < 1e-4
    np.testing.assert_allclose(s["angular_gaps_deg"], 90.0, atol=2.0)
    with pytest.raises(ValueError):
        ib.solve_constrained("nope")
