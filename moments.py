"""Sufficient statistics of the Gaussian models, so that adding images updates a model exactly.

A `Moments` holds, for a set of rows x (n, C) float64 (or a stack of such sets, one per patch
position: (..., n, C)), the count n, the mean m, the scatter matrix S = sum (x - m)(x - m)^T and,
where the estimator needs them (sklearn's Ledoit-Wolf shrinkage), the third and fourth moments about
the mean, t = sum |x - m|^2 (x - m) and f = sum |x - m|^4. Two sets' moments merge exactly (Chan et
al.'s pairwise update, extended to t and f by shifting each set's moments to the joint mean), so a
model updated with new images equals the model fitted on all of them, up to float64 rounding; and
the Gaussians are estimated from moments in both cases (`ledoit_wolf_eigenvalues`,
`regularized_covariance`), so the fit and the update share one formula.
"""
import dataclasses

import numpy as np


@dataclasses.dataclass
class Moments:
    """count: n; mean (..., C); scatter (..., C, C); cube (..., C) and fourth (...) or None (not kept).
    All float64."""
    count: int
    mean: np.ndarray
    scatter: np.ndarray
    cube: np.ndarray = None
    fourth: np.ndarray = None

    @classmethod
    def of(cls, rows, higher=True):
        """Moments of rows (..., n, C); higher: keep the third and fourth moments too."""
        rows = np.ascontiguousarray(rows, np.float64)  # batched products are slow on strided views
        mean = rows.mean(axis=-2)
        centred = rows - mean[..., None, :]
        scatter = np.swapaxes(centred, -1, -2) @ centred
        if not higher:
            return cls(rows.shape[-2], mean, scatter)
        norms = np.einsum('...nc,...nc->...n', centred, centred)
        return cls(rows.shape[-2], mean, scatter, np.einsum('...n,...nc->...c', norms, centred),
                   np.sum(norms ** 2, axis=-1))

    @property
    def higher(self):
        return self.cube is not None

    def _about(self, point):
        """(scatter, cube, fourth) of these rows about `point` (..., C) instead of their mean."""
        d = point - self.mean
        n = self.count
        sd = np.einsum('...ij,...j->...i', self.scatter, d)
        scatter = self.scatter + n * d[..., :, None] * d[..., None, :]
        if not self.higher:
            return scatter, None, None
        trace = np.trace(self.scatter, axis1=-2, axis2=-1)
        dd = np.einsum('...c,...c->...', d, d)
        # with y = x - m summing to zero: sum |y - d|^2 (y - d) and sum |y - d|^4, expanded
        cube = self.cube - trace[..., None] * d - 2 * sd - n * dd[..., None] * d
        fourth = (self.fourth + 4 * np.einsum('...c,...c->...', d, sd) + n * dd ** 2
                  - 4 * np.einsum('...c,...c->...', d, self.cube) + 2 * dd * trace)
        return scatter, cube, fourth

    def merge(self, other):
        """The moments of both sets' rows together -> Moments."""
        count = self.count + other.count
        mean = (self.count * self.mean + other.count * other.mean) / count
        mine, theirs = self._about(mean), other._about(mean)
        return Moments(count, mean, *(None if a is None else a + b for a, b in zip(mine, theirs)))

    def remove(self, other):
        """The moments without the rows `other` describes (a subset of these rows) -> Moments: the
        inverse of merge (what undoing an addition, or leaving images out, needs)."""
        count = self.count - other.count
        mean = (self.count * self.mean - other.count * other.mean) / count
        mine, theirs = self._about(mean), other._about(mean)
        return Moments(count, mean, *(None if a is None else a - b for a, b in zip(mine, theirs)))

    def arrays(self, prefix):
        """{name: array} for the feature file: count as a 0-d int64 array, the symmetric scatter as its
        upper triangle, row by row (..., C (C + 1) / 2): half the bytes."""
        upper = np.triu_indices(self.mean.shape[-1])
        out = {f'{prefix}_count': np.array(self.count, np.int64), f'{prefix}_mean': self.mean,
               f'{prefix}_scatter': self.scatter[..., upper[0], upper[1]]}
        if self.higher:
            out.update({f'{prefix}_cube': self.cube, f'{prefix}_fourth': np.asarray(self.fourth, np.float64)})
        return out

    @classmethod
    def from_arrays(cls, arrays, prefix):
        higher = f'{prefix}_cube' in arrays
        mean = arrays[f'{prefix}_mean']
        upper = np.triu_indices(mean.shape[-1])
        scatter = np.zeros(mean.shape + mean.shape[-1:])
        scatter[..., upper[0], upper[1]] = arrays[f'{prefix}_scatter']
        scatter[..., upper[1], upper[0]] = arrays[f'{prefix}_scatter']
        return cls(int(arrays[f'{prefix}_count']), mean, scatter,
                   arrays[f'{prefix}_cube'] if higher else None,
                   arrays[f'{prefix}_fourth'] if higher else None)

    @staticmethod
    def declared(prefix, batch, channels, higher):
        """The feature file's declaration of `arrays(prefix)` (see AnomalyMethod.expected_state): batch
        a tuple of leading sizes (() or (P,))."""
        out = {f'{prefix}_count': ((), 'int64'), f'{prefix}_mean': (batch + (channels,), 'float64'),
               f'{prefix}_scatter': (batch + (channels * (channels + 1) // 2,), 'float64')}
        if higher:
            out.update({f'{prefix}_cube': (batch + (channels,), 'float64'), f'{prefix}_fourth': (batch, 'float64')})
        return out


def ledoit_wolf_shrinkage(count, channels, trace, frobenius, fourth):
    """sklearn.covariance.ledoit_wolf_shrinkage from moments: trace and frobenius (squared Frobenius
    norm) of the scatter matrix, fourth = sum |x - m|^4 -> (shrinkage, mu) arrays of the batch shape."""
    mu = trace / count / channels
    frobenius = frobenius / count ** 2
    beta = (fourth / count - frobenius) / (channels * count)
    delta = (frobenius - channels * mu ** 2) / channels
    beta = np.minimum(beta, delta)
    shrinkage = np.where(beta == 0, 0.0, beta / np.where(delta == 0, 1, delta))
    return (np.zeros_like(shrinkage) if channels == 1 else shrinkage), mu


def ledoit_wolf_eigenvalues(moments, scatter_eigenvalues):
    """The eigenvalues of sklearn's LedoitWolf covariance (the empirical covariance shrunk towards mu I,
    so with the scatter's eigenvectors) from moments and the scatter's eigenvalues (C,) -> (C,)."""
    channels = moments.mean.shape[-1]
    shrinkage, mu = ledoit_wolf_shrinkage(moments.count, channels, np.trace(moments.scatter),
                                          np.sum(moments.scatter ** 2), moments.fourth)
    return (1 - shrinkage) * scatter_eigenvalues / moments.count + shrinkage * mu


def regularized_covariance(moments, regularization):
    """The unbiased sample covariance + regularization * I (PaDiM), (..., C, C)."""
    return moments.scatter / (moments.count - 1) + regularization * np.eye(moments.mean.shape[-1])
