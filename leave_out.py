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

The same eigenbases estimate the Gaussians themselves: `ledoit_wolf_precision` (sklearn's LedoitWolf
through the Gram matrix when there are fewer rows than channels) and, for PixelGaussian, a `Basis` kept
from the rows it was made of, to which rows added later (teaching a detector more images) are joined
by Woodbury's identity in both `regularized_precision` and `regularized_distances`, at a cost linear in
the rows instead of an inversion or eigendecomposition per position.
"""
import dataclasses

import numpy as np

RELATIVE_EIGENVALUE_FLOOR = 1e-12  # eigen-directions below this share of the largest carry no data


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


def _quadratic(coords, eigenvalues, members, n, c1, c2, pieces):
    """y^T (c1 T_K + c2 I)^-1 y of every group's query y = x_q - m_K -> (..., G). c1, c2: (..., G).
    T_K = diag(eigenvalues) - Zg^T M Zg in the span's coordinates; the query lies in the span. pieces:
    _downdate's."""
    left_out, shift, m = pieces
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


def ledoit_wolf_distances(rows, groups, basis=None):
    """Leave-one-image-out distances under sklearn's LedoitWolf Gaussian (empirical covariance shrunk
    towards mu I by the Ledoit-Wolf coefficient, both recomputed without the image): rows (n, C) -> (G,).
    basis: spectral_basis(rows), where the caller has it."""
    rows = np.asarray(rows, np.float64)
    members, _ = _groups(groups)
    basis = spectral_basis(rows) if basis is None else basis
    kept = _kept_mask(basis.values)
    coords, eigenvalues = ((rows - basis.mean) @ basis.vectors)[:, kept], basis.values[kept]
    norms = np.einsum('nr,nr->n', coords, coords)
    return _ledoit_wolf_quadratic(coords, eigenvalues, members, len(rows), rows.shape[1], np.sum(norms ** 2),
                                  coords.T @ norms)


def _kept_mask(eigenvalues):
    """The eigen-directions that carry data (RELATIVE_EIGENVALUE_FLOOR of the largest), (..., r) -> bool mask."""
    return eigenvalues > RELATIVE_EIGENVALUE_FLOOR * np.maximum(eigenvalues.max(axis=-1, keepdims=True), 1e-300)


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


def ledoit_wolf_shrinkage(count, channels, trace, frobenius, fourth):
    """sklearn.covariance.ledoit_wolf_shrinkage from the scatter matrix's trace and squared Frobenius norm
    and fourth = sum |x - m|^4 over the count rows -> (shrinkage, mu) arrays of the batch shape."""
    mu = trace / count / channels
    frobenius = frobenius / count ** 2
    beta = (fourth / count - frobenius) / (channels * count)
    delta = (frobenius - channels * mu ** 2) / channels
    beta = np.minimum(beta, delta)
    shrinkage = np.where(beta == 0, 0.0, beta / np.where(delta == 0, 1, delta))
    return (np.zeros_like(shrinkage) if channels == 1 else shrinkage), mu


def ledoit_wolf_precision(rows, basis=None):
    """sklearn's LedoitWolf().fit(rows) as (location (C,), precision (C, C)) float64, the precision as
    its get_precision (scipy's pinvh: eigenvalues at or below max * C * eps count as 0), from the
    eigenbasis of the data's span (the n x n Gram matrix when n <= C: a 1280-channel level of 220 images
    costs a 220 x 220 eigendecomposition instead of a 1280 x 1280 one). rows (n, C); basis:
    spectral_basis(rows), where the caller has it."""
    basis = spectral_basis(rows) if basis is None else basis
    n, c = np.shape(rows)
    centred = np.asarray(rows, np.float64) - basis.mean
    norms = np.einsum('nc,nc->n', centred, centred)
    shrinkage, mu = ledoit_wolf_shrinkage(n, c, basis.values.sum(), np.sum(basis.values ** 2), np.sum(norms ** 2))
    spanned = (1 - shrinkage) * basis.values / n + shrinkage * mu   # the shrunk covariance's eigenvalues
    rest = shrinkage * mu                                           # ... on the directions the rows do not span
    data = np.any(basis.vectors != 0, axis=0)
    complement = c - int(data.sum())
    largest = max(spanned[data].max(initial=0), rest if complement else 0)
    cutoff = largest * c * np.finfo(np.float64).eps

    def inverse(values):
        values = np.asarray(values, np.float64)
        return np.where(np.abs(values) > cutoff, 1 / np.where(values == 0, 1, values), 0)
    rest_inverse = float(inverse(rest)) if complement else 0.0
    precision = (basis.vectors * np.where(data, inverse(spanned) - rest_inverse, 0)) @ basis.vectors.T
    precision[np.diag_indices(c)] += rest_inverse
    return basis.mean, precision


# ----------------------------------------------------------------------------------------------
# The regularized Gaussians of PixelGaussian: a kept eigenbasis, and the rows added after it
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Basis:
    """An eigenbasis of the scatter matrix of a Gaussian's first `count` training rows (per position):
    vectors (..., D, r) orthonormal columns (a zero column for a direction that carries no data),
    values (..., r) their eigenvalues, mean (..., D) those rows' mean; float64, r = min(count, D).
    What PixelGaussian keeps so that rows added later enter by Woodbury's identity instead of a new
    eigendecomposition or inversion (D^3 per position)."""
    vectors: np.ndarray
    values: np.ndarray
    count: int
    mean: np.ndarray


def spectral_basis(rows):
    """rows (..., n, D) -> Basis of all of them: from the n x n Gram matrix or the D x D scatter, the
    smaller (eigenvectors of the Gram matrix map to the scatter's through the rows)."""
    rows = np.asarray(rows, np.float64)
    mean = rows.mean(axis=-2)
    centred = rows - mean[..., None, :]
    n, d = centred.shape[-2:]
    if n <= d:
        values, vectors = np.linalg.eigh(centred @ np.swapaxes(centred, -1, -2))
        values = np.maximum(values, 0)
        kept = _kept_mask(values)
        scale = np.where(kept, 1 / np.sqrt(np.where(kept, values, 1)), 0)
        return Basis(np.swapaxes(centred, -1, -2) @ (vectors * scale[..., None, :]), np.where(kept, values, 0), n,
                     mean)
    values, vectors = np.linalg.eigh(np.swapaxes(centred, -1, -2) @ centred)
    return Basis(vectors, np.maximum(values, 0), n, mean)


def extra_rows(rows, basis):
    """The rows' scatter about their mean m is the basis rows' (the first basis.count) plus E^T E, with
    E = [the later rows - m; sqrt(count) (basis.mean - m)] (Chan et al.'s merge) -> E (..., K, D), K = 0
    when there are no later rows."""
    if rows.shape[-2] == basis.count:
        return np.zeros(rows.shape[:-2] + (0, rows.shape[-1]))
    mean = rows.mean(axis=-2)
    return np.concatenate([rows[..., basis.count:, :] - mean[..., None, :],
                           np.sqrt(basis.count) * (basis.mean - mean)[..., None, :]], axis=-2)


def _base_weights(basis, c1, c2):
    """(c1 B + c2 I)^-1 = I / c2 + V diag(w) V^T for B = V diag(values) V^T: w (..., r)."""
    return 1 / (c1 * basis.values + c2) - 1 / c2


def regularized_precision(rows, regularization, basis):
    """(the unbiased covariance of rows (P, n, D) + regularization I)^-1, (P, D, D) float64, from `basis`
    (of the first basis.count rows) and Woodbury's identity for the later ones E: with B the base part,
    the precision is I / c2 + V diag(w) V^T - Z H^-1 Z^T, Z = B^-1 E^T, H = I / c1 + E Z: a product of
    D x r by r x D per position and one of rank K, no inversion or eigendecomposition of D x D."""
    rows = np.asarray(rows, np.float64)
    c1, c2 = 1.0 / (rows.shape[-2] - 1), float(regularization)
    left, right = basis.vectors * _base_weights(basis, c1, c2)[..., None, :], basis.vectors   # (P, D, r)
    extra = extra_rows(rows, basis)                                                          # (P, K, D)
    precision = left @ np.swapaxes(right, -1, -2)
    if extra.shape[-2]:
        toward = extra / c2 + (extra @ basis.vectors) @ np.swapaxes(left, -1, -2)            # Z^T = E B^-1 (P, K, D)
        inner = np.eye(extra.shape[-2]) / c1 + toward @ np.swapaxes(extra, -1, -2)           # H (P, K, K)
        precision -= np.swapaxes(toward, -1, -2) @ np.linalg.solve(inner, toward)            # in place: no copies
    diagonal = np.arange(rows.shape[-1])
    precision[..., diagonal, diagonal] += 1 / c2
    return precision


def regularized_distances(rows, groups, regularization, basis=None):
    """Leave-one-image-out distances under Gaussians with covariance = the unbiased sample covariance +
    regularization * I (PixelGaussian), per position: rows (P, n, D) -> (P, G) float64.

    basis: the Basis of the first basis.count rows, where the caller keeps one (else spectral_basis of
    all the rows): the later rows E enter by Woodbury's identity with the left-out group's, in (K + g)
    x (K + g) per image, the K x K part shared (a Schur complement), so the cost stays linear in n."""
    rows = np.asarray(rows, np.float64)
    basis = spectral_basis(rows) if basis is None else basis
    members, g = _groups(groups)
    n = rows.shape[-2]
    c1, c2 = 1.0 / (n - g - 1), float(regularization)
    weights = _base_weights(basis, c1, c2)[..., None, :]                                    # (P, 1, r)

    def inner_products(a, a_coords, b, b_coords):  # a^T (c1 B + c2 I)^-1 b for rows of a and b
        return a @ np.swapaxes(b, -1, -2) / c2 + (a_coords * weights) @ np.swapaxes(b_coords, -1, -2)

    centred = rows - rows.mean(axis=-2, keepdims=True)                                       # Y (P, n, D)
    coords = centred @ basis.vectors                                                        # (P, n, r)
    # A group's vectors, its query y = x_q - m_K and its left-out rows D_G, are `combine` times its rows.
    combine = np.vstack([np.eye(g)[:1] + 1.0 / (n - g), np.eye(g)])                          # (g + 1, g)
    if np.array_equal(members.ravel(), np.arange(n)):  # each image's rows together, in order (as fitted): views
        grouped = centred.reshape(centred.shape[:-2] + members.shape + centred.shape[-1:])
        grouped_coords = coords.reshape(coords.shape[:-2] + members.shape + coords.shape[-1:])
    else:
        grouped, grouped_coords = centred[..., members, :], coords[..., members, :]          # (P, G, g, D | r)
    row_products = (np.einsum('...id,...jd->...ij', grouped, grouped) / c2
                    + np.einsum('...ir,...jr->...ij', grouped_coords * weights[..., None, :], grouped_coords))
    products = combine @ row_products @ combine.T                                           # (P, G, g + 1, g + 1)
    # T_K = T - D_G^T M D_G: the group's block of Woodbury's inner matrix is -M^-1 / c1 + D_G A^-1 D_G^T
    left_out = products[..., 1:, 1:] - (np.eye(g) - 1.0 / n) / c1
    toward = products[..., 1:, 0]                                                           # D_G A^-1 y
    quadratic = products[..., 0, 0]
    extra = extra_rows(rows, basis)                                                         # (P, K, D)
    if extra.shape[-2]:
        extra_coords = extra @ basis.vectors
        shared = np.eye(extra.shape[-2]) / c1 + inner_products(extra, extra_coords, extra, extra_coords)
        cross_rows = inner_products(extra, extra_coords, centred, coords)                   # (P, K, n)
        solved_rows = np.linalg.solve(shared, cross_rows)                                   # one solve per position

        def per_group(values):  # (P, K, n) over rows -> (P, G, K, g + 1) over each group's vectors
            return np.moveaxis(values[..., members], -3, -2) @ combine.T
        cross, solved = per_group(cross_rows), per_group(solved_rows)
        quadratic = quadratic - np.einsum('...k,...k->...', cross[..., 0], solved[..., 0])
        left_out = left_out - np.swapaxes(cross[..., 1:], -1, -2) @ solved[..., 1:]
        toward = toward - np.einsum('...kj,...k->...j', cross[..., 1:], solved[..., 0])
    correction = np.einsum('...j,...j->...', toward, np.linalg.solve(left_out, toward[..., None])[..., 0])
    return np.sqrt(np.maximum(quadratic - correction, 0))
