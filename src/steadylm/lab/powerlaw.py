"""Fit L(N) = E + A·N^(−α) to (parameters, loss) points, with bootstrap 95% intervals.

The fit follows Hoffmann et al. (2022, "Chinchilla", approach 3): minimise the Huber loss of
``log L − LSE(e, a − α·log N)`` (E = exp(e), A = exp(a): both stay positive) with L-BFGS from a
grid of starting points, keeping the best. ``log N`` is centred on the geometric mean of the sizes
so the problem is well conditioned; A is reported in the original units. Intervals: the percentile
bootstrap over points (each point one run: a size and a seed, so sizes and seeds are resampled
together); a resample with fewer than three distinct sizes cannot determine three parameters and
is drawn again.

:func:`steadylm.lab.ladder.fit_power_law` is this module's :func:`fit_power_law`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DEFAULT_HUBER_DELTA", "PowerLawFit", "fit_power_law"]

#: Huber threshold on log-loss residuals (Chinchilla's value).
DEFAULT_HUBER_DELTA = 1e-3
_ALPHA_BOUNDS = (0.0, 10.0)
_MIN_SIZES = 3
#: The whole grid is screened by its objective; this many of its best points are descended ...
_GRID_DESCENTS = 16
#: ... and L-BFGS starts from this many of the results.
_LBFGS_STARTS = 2


@dataclass
class PowerLawFit:
    """E, A, α with 95% intervals (``(low, high)``; NaN without a bootstrap)."""

    E: float
    A: float
    alpha: float
    E_ci: tuple[float, float] = (math.nan, math.nan)
    A_ci: tuple[float, float] = (math.nan, math.nan)
    alpha_ci: tuple[float, float] = (math.nan, math.nan)
    n_points: int = 0
    n_sizes: int = 0
    bootstrap: int = 0  # resamples that were fitted
    objective: float = math.nan  # Huber loss at the optimum
    samples: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)), repr=False)  # rows (E, A, α)

    def predict(self, n_params: float | Sequence[float] | np.ndarray) -> np.ndarray:
        n = np.asarray(n_params, dtype=float)
        return self.E + self.A * n ** (-self.alpha)

    def predict_samples(self, n_params: float) -> np.ndarray:
        """The prediction at ``n_params`` under every bootstrap sample."""
        s = self.samples
        return s[:, 0] + s[:, 1] * float(n_params) ** (-s[:, 2])

    def to_dict(self) -> dict[str, object]:
        return {"E": self.E, "A": self.A, "alpha": self.alpha, "E_ci": list(self.E_ci),
                "A_ci": list(self.A_ci), "alpha_ci": list(self.alpha_ci), "n_points": self.n_points,
                "n_sizes": self.n_sizes, "bootstrap": self.bootstrap, "objective": self.objective}


def _objective(theta: np.ndarray, x: np.ndarray, y: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    e, a, alpha = theta
    u = a - alpha * x
    m = np.maximum(e, u)
    pred = m + np.log(np.exp(e - m) + np.exp(u - m))
    r = pred - y
    absr = np.abs(r)
    quad = absr <= delta
    loss = float(np.sum(np.where(quad, 0.5 * r * r, delta * (absr - 0.5 * delta))))
    dr = np.clip(r, -delta, delta)
    w_e = np.exp(e - pred)
    w_u = np.exp(u - pred)
    grad = np.array([np.sum(dr * w_e), np.sum(dr * w_u), np.sum(dr * w_u * -x)])
    return loss, grad


def _minimise(x: np.ndarray, y: np.ndarray, starts: Sequence[np.ndarray], delta: float) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    best, best_loss = None, math.inf
    bounds = [(None, None), (None, None), _ALPHA_BOUNDS]
    for start in starts:
        res = minimize(_objective, start, args=(x, y, delta), jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": 200, "ftol": 1e-12, "gtol": 1e-9})
        if np.all(np.isfinite(res.x)) and res.fun < best_loss:
            best, best_loss = res.x, float(res.fun)
    if best is None:
        raise ValueError("fit_power_law: no starting point converged")
    return best, best_loss


def _weighted_objective(theta: np.ndarray, x: np.ndarray, y: np.ndarray, c: np.ndarray,
                        delta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Batched: theta [B, 3], counts c [B, n] -> (loss [B], gradient [B, 3], residuals, Jacobian)."""
    e, a, alpha = theta[:, 0:1], theta[:, 1:2], theta[:, 2:3]
    u = a - alpha * x[None, :]
    m = np.maximum(e, u)
    pred = m + np.log(np.exp(e - m) + np.exp(u - m))
    r = pred - y[None, :]
    absr = np.abs(r)
    loss = np.sum(c * np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta)), axis=1)
    w_u = np.exp(u - pred)
    jac = np.stack([np.exp(e - pred) * np.ones_like(r), w_u, -x[None, :] * w_u], axis=2)  # [B, n, 3]
    grad = np.einsum("bn,bnk->bk", c * np.clip(r, -delta, delta), jac)
    return loss, grad, r, jac


def _refit_weighted(x: np.ndarray, y: np.ndarray, counts: np.ndarray, start: np.ndarray, delta: float,
                    iters: int = 300, polish: bool = True) -> np.ndarray:
    """Minimise the same Huber objective for every row of ``counts`` (resample multiplicities),
    all at once: damped Gauss-Newton on the IRLS form of the Huber loss (weights min(1, δ/|r|))
    with a backtracking line search, so each resample's objective decreases monotonically from
    ``start`` (the full fit). Rows that do not converge are refitted with L-BFGS (:func:`_minimise`)."""
    B = counts.shape[0]
    start = np.asarray(start, dtype=float)
    theta = np.tile(start, (B, 1)) if start.ndim == 1 else start.copy()
    loss, grad, r, jac = _weighted_objective(theta, x, y, counts, delta)
    done = np.zeros(B, dtype=bool)
    for _ in range(iters):
        w = counts * np.minimum(1.0, delta / np.maximum(np.abs(r), 1e-300))
        h = np.einsum("bn,bnk,bnl->bkl", w, jac, jac) + 1e-12 * np.eye(3)[None]
        step = -np.linalg.solve(h, grad[:, :, None])[:, :, 0]
        t = np.ones(B)
        accepted = np.zeros(B, dtype=bool)
        new_theta, new_loss = theta.copy(), loss.copy()
        for _ls in range(30):
            trial = theta + t[:, None] * step
            trial[:, 2] = np.clip(trial[:, 2], *_ALPHA_BOUNDS)
            tl, _, _, _ = _weighted_objective(trial, x, y, counts, delta)
            ok = ~accepted & ~done & (tl <= loss - 1e-4 * t * np.maximum(0.0, -np.sum(grad * step, axis=1)))
            new_theta[ok], new_loss[ok] = trial[ok], tl[ok]
            accepted |= ok
            if np.all(accepted | done):
                break
            t = np.where(accepted, t, 0.5 * t)
        improvement = loss - new_loss
        done |= ~accepted | (improvement <= 1e-12 * np.maximum(loss, 1e-300))
        theta, loss = new_theta, new_loss
        loss, grad, r, jac = _weighted_objective(theta, x, y, counts, delta)
        if np.all(done):
            break
    # a resample whose gradient is still far from 0 gets the L-BFGS treatment
    scale = np.maximum(np.sum(counts, axis=1), 1.0)
    stuck = np.where(np.linalg.norm(grad, axis=1) / scale > 1e-6)[0] if polish else []
    for i in stuck:
        idx = np.repeat(np.arange(x.size), counts[i].astype(int))
        theta[i], _ = _minimise(x[idx], y[idx], [theta[i], start if start.ndim == 1 else start[i]], delta)
    return theta


def _grid(y: np.ndarray) -> list[np.ndarray]:
    lo, mean = float(np.exp(y.min())), float(np.exp(y.mean()))
    es = [math.log(lo * f) for f in (0.05, 0.4, 0.7, 0.9)]
    as_ = [math.log(mean * f) for f in (0.05, 0.2, 0.5, 1.0)]
    alphas = (0.05, 0.2, 0.5, 1.0, 2.0)
    return [np.array(t, dtype=float) for t in itertools.product(es, as_, alphas)]


def _unscale(theta: np.ndarray, log_n0: float) -> tuple[float, float, float]:
    e, a, alpha = (float(v) for v in theta)
    # A' N'^-α with N' = N / N0  ->  A = A' N0^α
    return math.exp(e), math.exp(a + alpha * log_n0), alpha


def fit_power_law(
    n_params: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    huber_delta: float = DEFAULT_HUBER_DELTA,
) -> PowerLawFit:
    """Fit L(N) = E + A·N^(−α) (see the module docstring); ``bootstrap`` resamples (0: none) drawn
    with ``numpy.random.default_rng(seed)`` give the 95% percentile intervals.

    Points with a non-finite or non-positive loss or size are dropped; fewer than three distinct
    sizes raise ``ValueError`` (three parameters need three sizes)."""
    n = np.asarray(n_params, dtype=float).reshape(-1)
    loss = np.asarray(losses, dtype=float).reshape(-1)
    if n.shape != loss.shape:
        raise ValueError(f"fit_power_law: {n.size} sizes but {loss.size} losses")
    ok = np.isfinite(n) & np.isfinite(loss) & (n > 0) & (loss > 0)
    n, loss = n[ok], loss[ok]
    sizes = np.unique(n)
    if sizes.size < _MIN_SIZES:
        raise ValueError(f"fit_power_law needs at least {_MIN_SIZES} distinct sizes with a finite loss, "
                         f"got {sizes.size}")
    if not (isinstance(bootstrap, int) and bootstrap >= 0):
        raise ValueError(f"bootstrap must be an integer >= 0, got {bootstrap!r}")
    log_n0 = float(np.mean(np.log(sizes)))
    x, y = np.log(n) - log_n0, np.log(loss)
    grid = np.asarray(_grid(y))
    screen, _, _, _ = _weighted_objective(grid, x, y, np.ones((len(grid), x.size)), huber_delta)
    # the best grid points descend together (batched Gauss-Newton), L-BFGS polishes the best two
    best = grid[np.argsort(screen)[:_GRID_DESCENTS]]
    descended = _refit_weighted(x, y, np.ones((len(best), x.size)), best, huber_delta, polish=False)
    final, _, _, _ = _weighted_objective(descended, x, y, np.ones((len(descended), x.size)), huber_delta)
    theta, obj = _minimise(x, y, [descended[i] for i in np.argsort(final)[:_LBFGS_STARTS]], huber_delta)
    E, A, alpha = _unscale(theta, log_n0)
    fit = PowerLawFit(E, A, alpha, n_points=int(n.size), n_sizes=int(sizes.size), objective=obj)
    if bootstrap == 0:
        return fit
    rng = np.random.default_rng(seed)
    counts = []
    draws = 0
    while len(counts) < bootstrap and draws < 20 * bootstrap:
        draws += 1
        c = np.bincount(rng.integers(0, n.size, n.size), minlength=n.size).astype(float)
        if np.unique(n[c > 0]).size >= _MIN_SIZES:
            counts.append(c)
    thetas = _refit_weighted(x, y, np.asarray(counts).reshape(-1, n.size), theta, huber_delta)
    samples = [_unscale(t, log_n0) for t in thetas if np.all(np.isfinite(t))]
    s = np.asarray(samples, dtype=float).reshape(-1, 3)
    fit.samples = s
    fit.bootstrap = int(s.shape[0])
    if s.shape[0]:
        lo, hi = np.percentile(s, [2.5, 97.5], axis=0)
        fit.E_ci, fit.A_ci, fit.alpha_ci = ((float(lo[i]), float(hi[i])) for i in range(3))
    return fit
