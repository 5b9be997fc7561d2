"""Leave-one-image-out Mahalanobis distances of the Gaussian models, exact and without refitting.

For each training image, its distance under the Gaussian fitted on all the other images: what a new
image scores under a model of n - 1 images, so the held-out scores of the n training images are
(nearly) exchangeable with a new image's under the full model. A k-fold hold-out instead fits on
(k - 1)/k of the images, and a Gaussian with about as many dimensions as samples (PaDiM keeps 200
channels per position) scores an unseen sample far higher when fitted on fewer samples: its
thresholds come out about twice too high (docs/thresholds.md).

How: every centred training row lies in the span of the data, of dimension r <= min(n, C). In the
eigenbasis of the scatter matrix T = sum (x - m)(x - m)^T (found once, from the n x n Gram matrix or
the C x C scatter, whichever is smaller), leaving out a group G of g rows (an image and its augmented
copies) changes T by a rank-g downdate,
    T_K = T - D_G^T (I + 1 1^T / (n - g)) D_G,      D_G = the centred rows of G,
and the mean by m_K = m - sum(D_G) / (n - g). A covariance c1 T_K + c2 I (c1, c2 from the model's
estimator) is inverted on the query by Woodbury's identity in g x g, so all n distances cost about
one fit. `ledoit_wolf_distances` reproduces sklearn's LedoitWolf (shrinkage recomputed for every
subset from its own second and fourth moments); `regularized_distances` the covariance + reg * I of
PixelGaussian. Shapes: rows (n, C) float; groups (n,) int, the source image of each row; the query of
a group is its first row (the plain view). Returned distances follow np.unique(groups).
"""
import numpy as np
from scipy import linalg

from moments import ledoit_wolf_shrinkage

RELATIVE_EIGENVALUE_FLOOR = 1e-12  # eigen-directions below this share of the largest carry no data


def span_coordinates(centred):
    """centred rows (..., n, C) float64 -> (Z (..., n, r) the rows' coordinates in the eigenbasis of
    their scatter matrix, eigenvalues (..., r) of that matrix), r = min(n, C)."""
    n, c = centred.shape[-2:]
    if n <= c:  # the Gram matrix's eigenvectors, scaled, are the coordinates
        eigenvalues, vectors = np.linalg.eigh(centred @ np.swapaxes(centred, -1, -2))
        eigenvalues = np.maximum(eigenvalues, 0)
        return vectors * np.sqrt(eigenvalues)[..., None, :], eigenvalues
    eigenvalues, basis = np.linalg.eigh(np.swapaxes(centred, -1, -2) @ centred)
    return centred @ basis, np.maximum(eigenvalues, 0)


def _groups(groups):
    """(rows of each group (G, g) int, their group size g) for equal-sized groups; ValueError otherwise."""
    _, first, counts = np.unique(groups, return_index=True, return_counts=True)
    if len(set(counts.tolist())) != 1:
        raise ValueError('leave-out distances need the same number of views for every image')
    order = np.argsort(groups, kind='stable')
    return order.reshape(len(counts), counts[0]), int(counts[0])


def _downdate(coords, members, n):
    """The pieces of every leave-group-out model: Zg (..., G, g, r) the left-out rows, the mean shift t
    (..., G, r) (m - m_K in coordinates) and M (g, g) = I + 1 1^T / (n - g)."""
    g = members.shape[1]
    left_out = coords[..., members, :]
    return left_out, left_out.sum(axis=-2) / (n - g), np.eye(g) + 1.0 / (n - g)


def _quadratic(coords, eigenvalues, members, n, c1, c2, pieces=None):
    """y^T (c1 T_K + c2 I)^-1 y of every group's query y = x_q - m_K -> (..., G). c1, c2: (..., G).
    T_K = diag(eigenvalues) - Zg^T M Zg in the span's coordinates; the query lies in the span. pieces:
    _downdate's, where the caller has them."""
    left_out, shift, m = pieces or _downdate(coords, members, n)
    query = coords[..., members[:, 0], :] + shift                                     # (..., G, r)
    diagonal = c1[..., None] * eigenvalues[..., None, :] + c2[..., None]              # A (..., G, r)
    diagonal = np.maximum(diagonal, np.finfo(np.float64).tiny)
    # Woodbury with U = sqrt(c1) Zg^T, so that c1 = 0 (a fully shrunk covariance) needs no 1 / c1.
    left_out = left_out * np.sqrt(c1)[..., None, None]
    scaled = left_out / diagonal[..., None, :]                                        # U^T A^-1
    m_inverse = np.eye(len(m)) - 1.0 / n                                              # (I + 11^T/(n-g))^-1
    inner = m_inverse - scaled @ np.swapaxes(left_out, -1, -2)                        # M^-1 - U^T A^-1 U
    projected = scaled @ query[..., None]                                              # U^T A^-1 y
    correction = (np.swapaxes(projected, -1, -2) @ np.linalg.solve(inner, projected))[..., 0, 0]
    return np.einsum('...r,...r->...', query, query / diagonal) + correction


def regularized_distances(rows, groups, regularization):
    """Leave-one-image-out distances under Gaussians with covariance = the unbiased sample covariance +
    regularization * I (PixelGaussian), per position: rows (P, n, D) -> (P, G) float64."""
    rows = np.asarray(rows, np.float64)
    members, g = _groups(groups)
    n = rows.shape[-2]
    coords, eigenvalues = span_coordinates(rows - rows.mean(axis=-2, keepdims=True))
    shape = coords.shape[:-2] + (len(members),)
    c1, c2 = np.full(shape, 1.0 / (n - g - 1)), np.full(shape, float(regularization))
    return np.sqrt(np.maximum(_quadratic(coords, eigenvalues, members, n, c1, c2), 0))


def ledoit_wolf_distances(rows, groups):
    """Leave-one-image-out distances under sklearn's LedoitWolf Gaussian (empirical covariance shrunk
    towards mu I by the Ledoit-Wolf coefficient, both recomputed without the image): rows (n, C) -> (G,)."""
    rows = np.asarray(rows, np.float64)
    members, _ = _groups(groups)
    coords, eigenvalues = span_coordinates(rows - rows.mean(axis=0))
    coords, eigenvalues = _kept(coords, eigenvalues)
    norms = np.einsum('nr,nr->n', coords, coords)
    return _ledoit_wolf_quadratic(coords, eigenvalues, members, len(rows), rows.shape[1], np.sum(norms ** 2),
                                  coords.T @ norms)


def _kept_mask(eigenvalues):
    """The eigen-directions that carry data (RELATIVE_EIGENVALUE_FLOOR) -> bool mask."""
    return eigenvalues > RELATIVE_EIGENVALUE_FLOOR * max(eigenvalues.max(), 1e-300)


def _kept(coords, eigenvalues):
    kept = _kept_mask(eigenvalues)
    return coords[..., kept], eigenvalues[kept]


def _ledoit_wolf_quadratic(coords, eigenvalues, members, n, c, fourth, cube):
    """Distances of every group's query under the Ledoit-Wolf Gaussian without the group. coords: the
    rows of `members` (and possibly others) in the eigenbasis of the scatter of all n rows, eigenvalues
    that scatter's; fourth = sum |x - m|^4 and cube = sum |x - m|^2 (x - m) (in that basis) of all n rows."""
    g = members.shape[1]
    left_out, shift, m = _downdate(coords, members, n)
    n_kept = n - g
    gram = left_out @ np.swapaxes(left_out, -1, -2)                                    # (G, g, g)
    weighted = (left_out * eigenvalues) @ np.swapaxes(left_out, -1, -2)
    trace = eigenvalues.sum() - np.einsum('ab,gab->g', m, gram)
    mg = m @ gram
    frobenius = (np.sum(eigenvalues ** 2) - 2 * np.einsum('ab,gab->g', m, weighted)
                 + np.einsum('gab,gba->g', mg, mg))
    # sum over the kept rows of |x - m_K|^4: all rows' sum with the mean shifted, less the left-out rows'
    shift_norm = np.einsum('gr,gr->g', shift, shift)
    all_rows = (fourth + 4 * np.einsum('gr,r,gr->g', shift, eigenvalues, shift) + n * shift_norm ** 2
                + 4 * shift @ cube + 2 * shift_norm * eigenvalues.sum())
    left_out_rows = np.sum(np.einsum('gkr,gkr->gk', left_out + shift[:, None], left_out + shift[:, None]) ** 2, axis=1)
    shrinkage, mu = ledoit_wolf_shrinkage(n_kept, c, trace, frobenius, all_rows - left_out_rows)
    quadratic = _quadratic(coords, eigenvalues, members, n, (1 - shrinkage) / n_kept, shrinkage * mu,
                           (left_out, shift, m))
    return np.sqrt(np.maximum(quadratic, 0))


# ----------------------------------------------------------------------------------------------
# From sufficient statistics (moments.Moments): the held-out scores of images just added to a model
# ----------------------------------------------------------------------------------------------

def ledoit_wolf_distances_from_moments(moments, rows, groups, eigen=None):
    """ledoit_wolf_distances of the images whose rows (m, C) are among those `moments` (with cube and
    fourth) describe, each left out of all n: one eigendecomposition of the C x C scatter (`eigen`,
    (eigenvalues, basis) of np.linalg.eigh, where the caller has it), then each image costs C^2 (rows,
    groups as in ledoit_wolf_distances) -> (G,)."""
    members, _ = _groups(groups)
    eigenvalues, basis = np.linalg.eigh(moments.scatter) if eigen is None else eigen
    eigenvalues = np.maximum(eigenvalues, 0)
    coords = (np.asarray(rows, np.float64) - moments.mean) @ basis
    kept = _kept_mask(eigenvalues)
    return _ledoit_wolf_quadratic(coords[:, kept], eigenvalues[kept], members, moments.count, moments.mean.shape[-1],
                                  moments.fourth, (moments.cube @ basis)[kept])


def regularized_distances_from_moments(moments, rows, groups, regularization):
    """regularized_distances of the images whose rows (P, m, D) are among those `moments` (P positions)
    describe, each left out of all n -> (P, G). One Cholesky factor of A = c1 S + c2 I per position (the
    covariance of n - g rows, with the full scatter: a sixth of an inverse's cost), then Woodbury's
    identity in g x g per image, with U = sqrt(c1) D_G^T the left-out rows."""
    members, g = _groups(groups)
    n = moments.count
    c1 = 1.0 / (n - g - 1)
    factors = np.linalg.cholesky(c1 * moments.scatter + regularization * np.eye(moments.mean.shape[-1]))
    centred = np.asarray(rows, np.float64) - moments.mean[:, None, :]                           # (P, m, D)
    grouped = centred[:, members]                                                               # (P, G, g, D)
    left_out = grouped * np.sqrt(c1)
    query = grouped[:, :, 0] + grouped.sum(axis=2) / (n - g)                                    # (P, G, D)
    # whitened by L^-1: y^T A^-1 y = |L^-1 y|^2, U^T A^-1 y = (L^-1 U)^T L^-1 y
    columns = np.concatenate([query[:, :, None], left_out], axis=2)                             # (P, G, g + 1, D)
    whitened = np.stack([linalg.solve_triangular(factor, position.reshape(-1, position.shape[-1]).T, lower=True)
                         .T.reshape(position.shape) for factor, position in zip(factors, columns)])
    wq, wu = whitened[:, :, 0], whitened[:, :, 1:]
    inner = (np.eye(g) - 1.0 / n) - wu @ np.swapaxes(wu, -1, -2)                              # M^-1 - U^T A^-1 U
    projected = np.einsum('pgkd,pgd->pgk', wu, wq)[..., None]                                   # U^T A^-1 y
    correction = (np.swapaxes(projected, -1, -2) @ np.linalg.solve(inner, projected))[..., 0, 0]
    return np.sqrt(np.maximum(np.einsum('pgd,pgd->pg', wq, wq) + correction, 0))
