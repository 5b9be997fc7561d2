"""Statistics: a feature becomes a score here, a score a verdict, and fitted state a feature file.

Methods, each over the same backbone feature maps (`METHODS`):
- `mahalanobis` (default): one Gaussian per network level over globally pooled features (mean and
  Ledoit-Wolf covariance), image score = sum over levels of the Mahalanobis distances (Rippel et
  al., 2020); heat maps from a per-position Gaussian (`PixelGaussian`).
- `padim`: a Gaussian per position over a random channel subset of mid-level maps (Defard et
  al., 2020); image score = maximum of the smoothed distance map.
- `spade`: k nearest training images by pooled deep features; per pixel, the nearest patch of those
  images (Cohen & Hoshen, 2020).
- `patchcore`: locally aware patches of two mid-level stages, a greedy coreset memory bank (chosen
  per chunk of images, linear in the training set), the nearest-neighbour distance through a faiss
  inverted-file index, with the paper's re-weighting (Roth et al., 2022).
Every method has the same interface (`AnomalyMethod`), so fitting, hold-out thresholds, scoring and
the feature file are written once. Thresholds: F1-optimal from labelled images, or from held-out
training images (a conformal order statistic for a stated false-positive rate); training images that
look defective can be left out of the fit (`holdout_without_outliers`). The feature file is an .npz
archive read with allow_pickle=False, so loading it cannot execute code.
"""
import io
import json
import os
import zipfile

import cv2
import numpy as np
from scipy.ndimage import uniform_filter
from sklearn.covariance import LedoitWolf
from sklearn.metrics import precision_recall_curve

from model_utils import atomic_write_bytes

FEATURE_FILE_FORMAT = 'mahalanobisad-features'
FEATURE_FILE_VERSION = 3  # 3: method_params hold the feature shapes the arrays follow from
PIXEL_MAP_SIGMA = 4.0  # Gaussian smoothing of the upsampled map, pixels (as in PaDiM and PatchCore)
MAP_CHANNELS = 128  # the most channels OpenCV 5's resize takes in one array (OpenCV 4: 512)
CORESET_CHUNK_PATCHES = 25088  # PatchCore's greedy coreset runs per chunk of this many patches (32 lite0 images)
IVF_PROBES = 8  # inverted lists searched per query by PatchCore's index


class FeatureFileError(ValueError):
    """A feature file cannot be used; the message says why."""


class MethodError(ValueError):
    """A method cannot work with this backbone; the message says why."""


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

def pool_features(feature_maps):
    """[(N, C_l, h_l, w_l), ...] -> [(N, C_l), ...] float32 by global average pooling."""
    return [m.reshape(m.shape[0], m.shape[1], -1).mean(axis=2) for m in feature_maps]


def choose_pixel_levels(map_sizes, input_size):
    """Indices of the outputs used for localization: those with a stride of 4 to 16 pixels.

    Deeper maps are too coarse to localise; shallower ones too generic (and large).
    """
    return [i for i, size in enumerate(map_sizes) if input_size / 16 <= size <= input_size / 4]


def _pooling_matrix(size, grid):
    """(size, grid) matrix whose product averages a length-`size` axis onto `grid` cells (area
    weights, exact for fractional cells). Two matrix products pool a map 7x faster than reshaping."""
    edges = np.linspace(0, size, grid + 1)
    pixel = np.arange(size)
    overlap = np.clip(np.minimum(pixel[:, None] + 1, edges[None, 1:]) - np.maximum(pixel[:, None], edges[None, :-1]), 0, None)
    return (overlap / overlap.sum(axis=0)).astype(np.float32)


def _bilinear_matrix(size, grid):
    """(size, grid) matrix whose product resamples a length-`size` axis to `grid` samples, bilinear
    with half-pixel centres (OpenCV's INTER_LINEAR, torch's align_corners=False)."""
    source = np.clip((np.arange(grid) + 0.5) * size / grid - 0.5, 0, size - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, size - 1)
    matrix = np.zeros((size, grid), np.float32)
    np.add.at(matrix, (low, np.arange(grid)), 1 - (source - low))
    np.add.at(matrix, (high, np.arange(grid)), source - low)
    return matrix


def resampling_matrix(size, grid):
    """(size, grid) float32 matrix resampling a length-`size` axis to `grid`: area average when
    shrinking, bilinear when enlarging."""
    return _pooling_matrix(size, grid) if size > grid else _bilinear_matrix(size, grid)


def resample(maps, grid):
    """(N, C, h, w) -> (N, C, grid, grid): area average when shrinking, bilinear when enlarging."""
    h, w = maps.shape[-2:]
    if (h, w) == (grid, grid):
        return maps
    return np.matmul(np.matmul(resampling_matrix(h, grid).T, maps), resampling_matrix(w, grid))


def embed_patches(feature_maps, levels, grid):
    """The chosen levels resampled to one grid and stacked: -> (N, P, D) float32, P = grid**2."""
    parts = [resample(feature_maps[level], grid) for level in levels]
    stacked = np.concatenate([p.reshape(p.shape[0], p.shape[1], -1) for p in parts], axis=1)
    return np.ascontiguousarray(stacked.transpose(0, 2, 1), np.float32)


def upsample_and_smooth(grids, output_size, sigma=PIXEL_MAP_SIGMA):
    """(N, g, g) -> (N, S, S): bilinear upsampling then Gaussian smoothing.

    The batch is laid out as image channels so OpenCV treats it in one call per MAP_CHANNELS maps.
    """
    out = np.empty((len(grids), output_size, output_size), np.float32)
    for start in range(0, len(grids), MAP_CHANNELS):
        chunk = np.ascontiguousarray(grids[start:start + MAP_CHANNELS].transpose(1, 2, 0), np.float32)
        resized = cv2.resize(chunk, (output_size, output_size), interpolation=cv2.INTER_LINEAR)
        smoothed = cv2.GaussianBlur(resized, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
        out[start:start + MAP_CHANNELS] = smoothed.reshape(output_size, output_size, -1).transpose(2, 0, 1)
    return out


def squared_distances(a, b):
    """(M, D), (B, D) -> (M, B) squared Euclidean distances, as |a|^2 - 2 a.b + |b|^2: one matrix
    product (rounding can make a few slightly negative; callers clip before a square root)."""
    return np.einsum('ij,ij->i', a, a)[:, None] - 2 * (a @ b.T) + np.einsum('ij,ij->i', b, b)[None]


def nearest_squared_distances(queries, bank, chunk=2048):
    """Squared Euclidean distance from each query row to its nearest bank row, and that row's index.

    queries (M, D), bank (B, D) float32 -> ((M,) float32 clipped at 0, (M,) int). Chunked matrix
    products keep memory at chunk x B and in cache: 3x faster than one (M, B) product on 25k x 2.5k
    (the coreset's chunks); measured 4.5 s against 5.3 s for scikit-learn's brute-force kNN on
    PatchCore's bottle bank (16k x 152), so no library is used here.
    """
    squared_min, indices = np.empty(len(queries), np.float32), np.empty(len(queries), np.int64)
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        squared = squared_distances(q, bank)
        best = squared.argmin(axis=1)
        indices[start:start + chunk] = best
        squared_min[start:start + chunk] = np.maximum(squared[np.arange(len(q)), best], 0)
    return squared_min, indices


def nearest_distances(queries, bank, chunk=2048):
    """nearest_squared_distances as distances: ((M,) float32, (M,) int)."""
    squared, indices = nearest_squared_distances(queries, bank, chunk)
    return np.sqrt(squared), indices


def random_projection(dims, projection_dims, rng):
    """(dims, projection_dims) float32 seeded Gaussian projection (Johnson-Lindenstrauss), or None
    where the points have no more dimensions than that. float32: a float64 projection would double
    the cost of every greedy step."""
    if dims <= projection_dims:
        return None
    return (rng.standard_normal((dims, projection_dims)) / np.sqrt(projection_dims)).astype(np.float32)


def farthest_first(points, count, first, min_squared=None):
    """Indices of `count` rows of points (M, d) float32, each the farthest from those before it
    (greedy k-centre), starting from row `first`, or, given min_squared (M,) (squared distances to
    points chosen earlier), from the farthest of those. One matrix-vector product per step."""
    squared_norms = np.einsum('ij,ij->i', points, points)
    chosen = np.empty(count, np.int64)
    if min_squared is None:
        chosen[0], min_squared = first, np.full(len(points), np.inf, np.float32)
    else:
        min_squared = min_squared.astype(np.float32)
        chosen[0] = int(min_squared.argmax())
    for i in range(1, count + 1):
        centre = points[chosen[i - 1]]
        np.minimum(min_squared, squared_norms - 2 * (points @ centre) + centre @ centre, out=min_squared)
        if i < count:
            chosen[i] = int(min_squared.argmax())
    return chosen


def greedy_coreset(points, count, projection_dims=128, seed=0):
    """Indices of `count` rows of `points` (M, D) chosen by greedy k-centre selection (PatchCore).

    Each step takes the point farthest from those chosen, so every point ends up close to a chosen
    one. Distances are measured after a seeded Gaussian random projection to projection_dims, as in
    the paper. Costs M x count steps: the exact reference that chunked_coreset is measured against.
    """
    rng = np.random.default_rng(seed)
    projection = random_projection(points.shape[1], projection_dims, rng)
    return farthest_first(points if projection is None else points @ projection, count, rng.integers(len(points)))


def chunked_coreset(patches, ratio, folds=None, chunk_patches=CORESET_CHUNK_PATCHES, projection_dims=128, seed=0):
    """Flat indices into patches.reshape(-1, D) of about ratio x N x P patches: greedy k-centre over
    chunks of consecutive rows (images) of the same fold, each chunk starting from what the
    previous chunk of its fold chose, merged.

    patches (N, P, D) float32; folds (N,) int or None (one fold). The exact greedy costs (patches x
    bank), quadratic in the training set; chunks of at most `chunk_patches` patches make it linear,
    and starting from the previous chunk's choice spends a chunk's share of the bank on what that
    choice does not already cover (measured in benchmarks/patchcore_scale.py --coverage). Chunks
    never straddle folds, so the bank of a fit without fold k is this bank without fold k's chunks.
    """
    n, p, d = patches.shape
    folds = np.zeros(n, np.int64) if folds is None else np.asarray(folds)
    rng = np.random.default_rng(seed)
    projection = random_projection(d, projection_dims, rng)
    rows_per_chunk = max(1, chunk_patches // p)
    chosen = []
    for fold in np.unique(folds):
        rows = np.flatnonzero(folds == fold)
        previous = None  # the projected points the previous chunk of this fold chose
        for start in range(0, len(rows), rows_per_chunk):
            chunk_rows = rows[start:start + rows_per_chunk]
            points = patches[chunk_rows].reshape(-1, d)
            points = points if projection is None else points @ projection
            covered = None if previous is None else nearest_squared_distances(points, previous)[0]
            count = max(1, int(round(ratio * len(points))))
            picked = farthest_first(points, count, 0, covered)
            previous = points[picked]
            chosen.append(chunk_rows[picked // p] * p + picked % p)
    return np.concatenate(chosen)


def _faiss():
    """faiss, imported on first use (only PatchCore pays its start-up time), on one thread: its work
    stays on the caller's thread like all scoring arithmetic, and k-means gives the same centres
    whatever the number of cores."""
    import faiss
    faiss.omp_set_num_threads(1)
    return faiss


def ivf_centroids(bank, seed=0):
    """(L, D) float32 centres of the inverted lists of a bank (B, D): seeded k-means (faiss), about
    2 sqrt(B) lists of at least 39 rows (faiss's minimum per centre); (0, D) where the bank is too
    small for lists to pay (exact search)."""
    lists = int(min(2 * np.sqrt(len(bank)), len(bank) / 39))
    if lists < 2 * IVF_PROBES:
        return np.zeros((0, bank.shape[1]), np.float32)
    kmeans = _faiss().Kmeans(bank.shape[1], lists, niter=10, seed=seed, max_points_per_centroid=64)
    kmeans.train(np.ascontiguousarray(bank, np.float32))
    return kmeans.centroids


class NearestPatchIndex:
    """The nearest row of a bank (B, D) float32 to each query: faiss's inverted-file index (IVF-Flat).

    Chosen by measurement on PatchCore's bottle banks (15k and 59k rows, lite0, one thread, held-out
    images; README "PatchCore at scale"): searching IVF_PROBES of about 2 sqrt(B) lists found the
    exact nearest patch for all but < 1 in 10,000 queries, 7-15x faster than brute force, and built
    in 0.4 s / 3 s; HNSW graphs (faiss, hnswlib) and usearch were 2x slower per query at equal or
    lower recall, took 2-3 s / 17-22 s to build, and would have to be stored as library blobs.
    Here the index is rebuilt from two plain arrays, the bank and `centroids` (L, D) float32 (see
    ivf_centroids), by assigning each bank row to its nearest centre: loading a feature file never
    parses a library's serialized format. With no centroids, or exact=True, search is brute force.
    """

    def __init__(self, bank, centroids, probes=IVF_PROBES):
        self.bank, self.centroids, self.probes = bank, centroids, probes
        self.index = None
        if len(centroids):
            faiss = _faiss()
            quantizer = faiss.IndexFlatL2(bank.shape[1])
            quantizer.add(np.ascontiguousarray(centroids, np.float32))
            self.index = faiss.IndexIVFFlat(quantizer, bank.shape[1], len(centroids))
            self.index.add(np.ascontiguousarray(bank, np.float32))
            self.index.nprobe = probes

    def row_lists(self):
        """(B,) int64: the inverted list each bank row was filed in, read back from the index
        (so that an export probes exactly the rows this index searches); None without lists."""
        if self.index is None:
            return None
        faiss, lists = _faiss(), self.index.invlists
        labels = np.empty(len(self.bank), np.int64)
        for l in range(lists.nlist):
            if lists.list_size(l):
                labels[faiss.rev_swig_ptr(lists.get_ids(l), lists.list_size(l))] = l
        return labels

    def search(self, queries, exact=False):
        """queries (M, D) float32 -> (distances (M,) float32, indices (M,) int64) of the nearest bank row."""
        if self.index is None or exact:
            return nearest_distances(queries, self.bank)
        squared, indices = self.index.search(np.ascontiguousarray(queries, np.float32), 1)
        distances, indices = np.sqrt(np.maximum(squared[:, 0], 0)), indices[:, 0]
        unfound = np.flatnonzero(indices < 0)  # every probed list empty: never seen, but never wrong
        if len(unfound):
            distances[unfound], indices[unfound] = nearest_distances(queries[unfound], self.bank)
        return distances, indices


class MahalanobisAD:
    """Per-level Gaussians over pooled features; the image score is the summed distance.

    Fitted state: means_[l] (C_l,), precisions_[l] (C_l, C_l), float32: estimated in float64,
    stored and applied in float32, which moves scores by about 1e-7 relative and halves the cost.
    """

    def __init__(self, means=None, precisions=None):
        self.means_ = means or []
        self.precisions_ = precisions or []

    def fit(self, train_features):
        """train_features: [(N, C_l) float, ...] pooled features of the N training images."""
        self.means_, self.precisions_ = [], []
        for features in train_features:
            estimator = LedoitWolf().fit(np.asarray(features, np.float64))
            self.means_.append(estimator.location_.astype(np.float32))
            self.precisions_.append(estimator.get_precision().astype(np.float32))
        return self

    def level_distances(self, features):
        """[(N, C_l), ...] -> (N, L) Mahalanobis distance of each image at each level."""
        distances = []
        for x, mean, precision in zip(features, self.means_, self.precisions_):
            centred = np.asarray(x, np.float32) - mean
            distances.append(np.sqrt(np.maximum(np.einsum('ij,ij->i', centred @ precision, centred), 0)))
        return np.stack(distances, axis=1)

    def score(self, features):
        """[(N, C_l), ...] -> (N,) image anomaly scores (sum of the per-level distances)."""
        return self.level_distances(features).sum(axis=1)


class PixelGaussian:
    """A Gaussian per patch position, over D channels.

    Fitted state: mean_ (P, D) and precision_ (P, D, D) float32.
    """

    def __init__(self, regularization=0.01, mean=None, precision=None):
        self.regularization = regularization  # added to the covariance diagonal, as in PaDiM
        self.mean_, self.precision_ = mean, precision

    def fit(self, patches):
        """patches: (N, P, D) for N training images."""
        n = patches.shape[0]
        if n < 2:
            raise ValueError('need at least 2 training images')
        by_position = np.ascontiguousarray(patches.transpose(1, 0, 2))
        mean = by_position.mean(axis=1, dtype=np.float64)
        centred = by_position - mean[:, None, :].astype(np.float32)
        covariance = np.matmul(centred.transpose(0, 2, 1), centred, dtype=np.float64) / (n - 1)
        covariance += self.regularization * np.eye(covariance.shape[-1])
        self.mean_ = mean.astype(np.float32)
        self.precision_ = np.linalg.inv(covariance).astype(np.float32)
        return self

    def distances(self, patches):
        """(N, P, D) -> (N, P) Mahalanobis distance of each patch to its position's Gaussian."""
        centred = patches.transpose(1, 0, 2) - self.mean_[:, None, :]
        squared = np.einsum('pnd,pnd->pn', np.matmul(centred, self.precision_), centred)
        return np.sqrt(np.maximum(squared, 0)).T


# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------

class AnomalyMethod:
    """One detection method over backbone feature maps.

    configure(shapes, input_size): choose levels for this backbone from its outputs' (C, h, w)
    shapes and the input side (raises MethodError if none fit).
    features(feature_maps) -> {name: (N, ...) array}: what the method keeps of a batch.
    fit(features, folds=None): estimate the state from training features; folds (N,) int: the
    hold-out fold of each row (holdout_folds), which a method may align its work with.
    holdout_model(features, kept): the method fitted on the rows `kept` (N,) bool only.
    score(features, output_size) -> (image scores (N,), anomaly maps (N, S, S) float32 or None).
    `params` rebuilds the configured method, `state()` / `load_state()` hold the fitted arrays.
    screened_by: the method whose held-out scores find defective training images (contamination),
    None for this one's own.
    """
    name = ''
    screened_by = None

    def __init__(self, **params):
        self.params = params

    def configure(self, shapes, input_size):
        """Subclasses choose their levels after this; the feature maps' shapes are kept so that the
        fitted state's shapes follow from `params` alone (see `expected_state`)."""
        self.params['feature_shapes'] = [[int(n) for n in shape] for shape in shapes]

    def expected_state(self):
        """{name: (shape, dtype)} of every array `state()` returns, from `params` alone: a shape
        entry is an int, or a letter for a size the params do not fix (equal letters, equal sizes;
        a letter ending in '*' may be 0).
        Raises ValueError when the params themselves are not what `configure` writes. The feature
        file checks a file against this before reading any array."""
        raise NotImplementedError

    def holdout_model(self, features, kept):
        """A model fitted without the rows not `kept` (the hold-out); PatchCore carves it out of its fit."""
        return type(self)(**self.params).fit(select_features(features, kept))

    def holdout_source(self, features, folds):
        """What to take the hold-out models of training rows `features` split into `folds` from (see
        holdout_scores): this method as it is, whose holdout_model fits each one afresh."""
        return self

    def _channels(self, levels):
        """Channels of the feature maps at `levels` (validated), summed."""
        shapes = self.params.get('feature_shapes')
        if not (isinstance(shapes, list) and 0 < len(shapes) <= 64
                and all(isinstance(s, list) and len(s) == 3 and all(_is_int(n) and 0 < n <= 1 << 16 for n in s)
                        for s in shapes)):
            raise ValueError(f'feature_shapes {shapes!r} are not (C, h, w) shapes')
        if not (isinstance(levels, list) and len(set(map(repr, levels))) == len(levels)
                and all(_is_int(level) and 0 <= level < len(shapes) for level in levels)):
            raise ValueError(f'levels {levels!r} are not distinct indices of the {len(shapes)} feature maps')
        return sum(shapes[level][0] for level in levels)

    def _param(self, key, check, what):
        value = self.params.get(key)
        if not check(value):
            raise ValueError(f'{key}={value!r} is not {what}')
        return value

    def _grid(self):
        return self._param('grid', lambda g: _is_int(g) and 0 < g <= 1024, 'a grid side in 1..1024')


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _gaussian_state(positions, dims):
    """Declared state of a PixelGaussian over `positions` patches of `dims` channels."""
    return {'pixel_mean': ((positions, dims), 'float32'), 'pixel_precision': ((positions, dims, dims), 'float32')}


class MahalanobisMethod(AnomalyMethod):
    name = 'mahalanobis'
    # Its image score pools each level over the whole image, which averages a small defect away:
    # PaDiM's per-position scores on the same backbone outputs find the defective training images
    # (metal_nut, 22 planted: 20 found against 17 by its own scores; README "Contamination").
    screened_by = 'padim'

    def configure(self, shapes, input_size):
        super().configure(shapes, input_size)
        pixel_levels, grid = patch_grid(shapes, input_size)
        self.params.update(image_levels=list(range(len(shapes))), pixel_levels=pixel_levels, grid=grid)

    @property
    def localizes(self):
        return bool(self.params['pixel_levels'])

    def features(self, feature_maps):
        pooled = pool_features([feature_maps[l] for l in self.params['image_levels']])
        out = {f'pooled{l}': p for l, p in zip(self.params['image_levels'], pooled)}
        if self.localizes:
            out['patches'] = embed_patches(feature_maps, self.params['pixel_levels'], self.params['grid'])
        return out

    def fit(self, features, folds=None):
        self.image_model = MahalanobisAD().fit([features[f'pooled{l}'] for l in self.params['image_levels']])
        self.pixel_model = PixelGaussian().fit(features['patches']) if self.localizes else None
        return self

    def score(self, features, output_size):
        scores = self.image_model.score([features[f'pooled{l}'] for l in self.params['image_levels']])
        if self.pixel_model is None:
            return scores, None
        grid = self.params['grid']
        return scores, upsample_and_smooth(self.pixel_model.distances(features['patches']).reshape(-1, grid, grid),
                                           output_size)

    def state(self):
        arrays = {}
        for l, mean, precision in zip(self.params['image_levels'], self.image_model.means_,
                                      self.image_model.precisions_):
            arrays[f'image_mean_{l}'], arrays[f'image_precision_{l}'] = mean, precision
        if self.pixel_model is not None:
            arrays['pixel_mean'], arrays['pixel_precision'] = self.pixel_model.mean_, self.pixel_model.precision_
        return arrays

    def expected_state(self):
        levels = self.params.get('image_levels')
        self._channels(levels)
        shapes = self.params['feature_shapes']
        state = {}
        for level in levels:
            channels = shapes[level][0]
            state[f'image_mean_{level}'] = ((channels,), 'float32')
            state[f'image_precision_{level}'] = ((channels, channels), 'float32')
        if self.params.get('pixel_levels'):
            state.update(_gaussian_state(self._grid() ** 2, self._channels(self.params['pixel_levels'])))
        return state

    def load_state(self, arrays):
        levels = self.params['image_levels']
        self.image_model = MahalanobisAD([arrays[f'image_mean_{l}'] for l in levels],
                                         [arrays[f'image_precision_{l}'] for l in levels])
        self.pixel_model = (PixelGaussian(mean=arrays['pixel_mean'], precision=arrays['pixel_precision'])
                            if self.localizes else None)
        return self


def patch_grid(shapes, input_size, required_by=None):
    """Localization levels (stride 4..16) of outputs of (C, h, w) `shapes`, and the side of the
    coarsest of them: ([], 0) if none, or MethodError if the method `required_by` needs them."""
    map_sizes = [shape[-1] for shape in shapes]
    levels = choose_pixel_levels(map_sizes, input_size)
    if not levels and required_by:
        raise MethodError(f'{required_by} needs feature maps of stride 4..16; this backbone has none: '
                          'use --method mahalanobis')
    return levels, min(map_sizes[l] for l in levels) if levels else 0


class PadimMethod(AnomalyMethod):
    """params: dims (channels kept, at random), seed; configured: levels, grid, channels."""
    name = 'padim'
    localizes = True

    def configure(self, shapes, input_size):
        super().configure(shapes, input_size)
        levels, grid = patch_grid(shapes, input_size, required_by=self.name)
        total = sum(shapes[l][0] for l in levels)
        rng = np.random.default_rng(self.params['seed'])
        channels = np.sort(rng.choice(total, min(self.params['dims'], total), replace=False))
        self.params.update(levels=levels, grid=grid, channels=channels.tolist())

    def features(self, feature_maps):
        patches = embed_patches(feature_maps, self.params['levels'], self.params['grid'])
        return {'patches': np.ascontiguousarray(patches[..., self.params['channels']])}

    def fit(self, features, folds=None):
        self.model = PixelGaussian().fit(features['patches'])
        return self

    def score(self, features, output_size):
        grid = self.params['grid']
        maps = upsample_and_smooth(self.model.distances(features['patches']).reshape(-1, grid, grid), output_size)
        return maps.reshape(len(maps), -1).max(axis=1), maps

    def state(self):
        return {'pixel_mean': self.model.mean_, 'pixel_precision': self.model.precision_}

    def expected_state(self):
        total = self._channels(self.params.get('levels'))
        channels = self._param('channels', lambda c: isinstance(c, list) and c and all(_is_int(i) for i in c)
                               and c == sorted(set(c)) and 0 <= c[0] and c[-1] < total,
                               f'a sorted subset of the {total} channels')
        return _gaussian_state(self._grid() ** 2, len(channels))

    def load_state(self, arrays):
        self.model = PixelGaussian(mean=arrays['pixel_mean'], precision=arrays['pixel_precision'])
        return self


class SpadeMethod(AnomalyMethod):
    """params: k (nearest training images); configured: image_level (deepest), levels, grid."""
    name = 'spade'
    localizes = True

    def configure(self, shapes, input_size):
        super().configure(shapes, input_size)
        levels, grid = patch_grid(shapes, input_size, required_by=self.name)
        self.params.update(image_level=len(shapes) - 1, levels=levels, grid=grid)

    def features(self, feature_maps):
        return {'pooled': pool_features([feature_maps[self.params['image_level']]])[0],
                'patches': embed_patches(feature_maps, self.params['levels'], self.params['grid'])}

    def fit(self, features, folds=None):
        self.train_pooled, self.train_patches = features['pooled'], features['patches']
        return self

    def score(self, features, output_size):
        k = min(self.params['k'], len(self.train_pooled))
        distances = np.sqrt(np.maximum(squared_distances(features['pooled'], self.train_pooled), 0))
        nearest = np.argpartition(distances, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(distances, nearest, axis=1).mean(axis=1)
        # Each test image has its own gallery (the patches of its k nearest training images), so the
        # pixel search runs per image, each one a chunked matrix product.
        grid, d = self.params['grid'], self.train_patches.shape[-1]
        grids = np.stack([nearest_distances(patches, self.train_patches[gallery].reshape(-1, d))[0]
                          for patches, gallery in zip(features['patches'], nearest)])
        return scores, upsample_and_smooth(grids.reshape(-1, grid, grid), output_size)

    def state(self):
        return {'train_pooled': self.train_pooled, 'train_patches': self.train_patches}

    def expected_state(self):
        self._param('k', lambda k: _is_int(k) and k > 0, 'a positive integer')
        pooled = self._channels([self.params.get('image_level')])
        return {'train_pooled': (('N', pooled), 'float32'),
                'train_patches': (('N', self._grid() ** 2, self._channels(self.params.get('levels'))), 'float32')}

    def load_state(self, arrays):
        self.train_pooled, self.train_patches = arrays['train_pooled'], arrays['train_patches']
        return self


class PatchCoreMethod(AnomalyMethod):
    """params: coreset_ratio, projection_dims, neighbours (re-weighting), seed; configured: levels
    (the deepest outputs of stride 8 and of stride 16), grid (the stride-8 map's side).

    Fitted state: bank (B, D) float32, the memory bank (a chunked greedy coreset, chunked_coreset);
    centroids (L, D) float32, the inverted lists of its nearest-neighbour index (NearestPatchIndex).
    exact_search (attribute, default False): score by brute force instead of the index.
    """
    name = 'patchcore'
    localizes = True
    exact_search = False
    fit_folds = bank_rows = None  # set by fit, not stored: they serve the hold-out only

    def configure(self, shapes, input_size):
        super().configure(shapes, input_size)
        map_sizes = [shape[-1] for shape in shapes]
        strides = [input_size / size for size in map_sizes]
        stride8 = [i for i, s in enumerate(strides) if 6 <= s < 12]
        stride16 = [i for i, s in enumerate(strides) if 12 <= s < 24]
        if not stride8 or not stride16:
            raise MethodError('patchcore needs feature maps of stride 8 and 16; this backbone has none: '
                              'use --method mahalanobis')
        self.params.update(levels=[stride8[-1], stride16[-1]], grid=map_sizes[stride8[-1]])

    def features(self, feature_maps):
        # Locally aware patches: a 3x3 average around each position (zero padding, as AvgPool2d(3, 1, 1)).
        aggregated = {l: uniform_filter(feature_maps[l], size=(1, 1, 3, 3), mode='constant')
                      for l in self.params['levels']}
        return {'patches': embed_patches(aggregated, self.params['levels'], self.params['grid'])}

    def fit(self, features, folds=None):
        patches = features['patches']
        chosen = chunked_coreset(patches, self.params['coreset_ratio'], folds,
                                 projection_dims=self.params['projection_dims'], seed=self.params['seed'])
        bank = np.ascontiguousarray(patches.reshape(-1, patches.shape[-1])[chosen])
        # The bank row's source row and its fold: hold-out models are this bank without a fold.
        self.bank_rows, self.fit_folds = chosen // patches.shape[1], folds
        return self.set_bank(bank, ivf_centroids(bank, self.params['seed']))

    def set_bank(self, bank, centroids):
        self.bank, self.centroids = bank, centroids
        self.index = NearestPatchIndex(bank, centroids)
        return self

    def holdout_source(self, features, folds):
        # One fit with the folds, each hold-out model carved out of it: one coreset, not one per fold.
        return type(self)(**self.params).fit(features, folds)

    def holdout_model(self, features, kept):
        # Chunks never straddle the fit's folds: without whole folds, the fit is a subset of this one.
        folds = self.fit_folds
        if folds is None or not np.array_equal(kept, np.isin(folds, folds[kept])):
            return super().holdout_model(features, kept)
        model = type(self)(**self.params)
        keep = kept[self.bank_rows]
        return model.set_bank(np.ascontiguousarray(self.bank[keep]), self.centroids)

    def score(self, features, output_size):
        n, p, d = features['patches'].shape
        distances, indices = self.index.search(features['patches'].reshape(-1, d), exact=self.exact_search)
        distances, indices = distances.reshape(n, p), indices.reshape(n, p)
        # Re-weighting (PatchCore eq. 7): the most anomalous patch's score counts less when its
        # nearest bank patch lies in a dense region of the bank, where the distance is less telling.
        worst = distances.argmax(axis=1)
        worst_patch = features['patches'][np.arange(n), worst]
        worst_distance = distances[np.arange(n), worst]
        anchor = self.bank[indices[np.arange(n), worst]]
        b = min(self.params['neighbours'], len(self.bank))
        to_bank = squared_distances(anchor, self.bank)  # order only: no square root needed
        neighbourhood = self.bank[np.argpartition(to_bank, b - 1, axis=1)[:, :b]]       # (n, b, d)
        spread = np.linalg.norm(neighbourhood - worst_patch[:, None], axis=2)            # (n, b)
        weight = 1 - 1 / np.exp(spread - worst_distance[:, None]).sum(axis=1)           # stable softmax
        grid = self.params['grid']
        return weight * worst_distance, upsample_and_smooth(distances.reshape(-1, grid, grid), output_size)

    def state(self):
        return {'memory_bank': self.bank, 'bank_centroids': self.centroids}

    def expected_state(self):
        self._param('neighbours', lambda k: _is_int(k) and k > 0, 'a positive integer')
        self._grid()
        channels = self._channels(self.params.get('levels'))
        return {'memory_bank': (('M', channels), 'float32'), 'bank_centroids': (('L*', channels), 'float32')}

    def load_state(self, arrays):
        bank, centroids = arrays['memory_bank'], arrays['bank_centroids']
        if bank.ndim != 2 or not len(bank) or centroids.ndim != 2 or centroids.shape[1] != bank.shape[1]:
            raise FeatureFileError(f'memory bank {bank.shape} and index centres {centroids.shape} do not fit together')
        return self.set_bank(np.ascontiguousarray(bank, np.float32), np.ascontiguousarray(centroids, np.float32))


METHODS = {m.name: m for m in (MahalanobisMethod, PadimMethod, SpadeMethod, PatchCoreMethod)}


def make_method(name, padim_dims=200, spade_k=50, coreset_ratio=0.1, seed=0):
    """An unconfigured method with the user's options (only the ones it uses)."""
    options = {'mahalanobis': {}, 'padim': {'dims': padim_dims, 'seed': seed}, 'spade': {'k': spade_k},
               'patchcore': {'coreset_ratio': coreset_ratio, 'projection_dims': 128, 'neighbours': 9, 'seed': seed}}
    return METHODS[name](**options[name])


def concatenate_features(batches):
    """[{name: (n_i, ...)}, ...] -> {name: (sum n_i, ...)}."""
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def select_features(features, rows):
    return {key: value[rows] for key, value in features.items()}


# ----------------------------------------------------------------------------------------------
# Thresholds
# ----------------------------------------------------------------------------------------------

def f1_optimal_threshold(labels, scores):
    """The score threshold (anomalous if score >= threshold) that maximises F1, and that F1.

    labels: bool (M,), true = anomalous; scores: (M,). Needs both classes.
    """
    labels, scores = np.asarray(labels).ravel(), np.asarray(scores).ravel()
    if labels.all() or not labels.any():
        raise ValueError('F1-optimal threshold needs both normal and anomalous samples')
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))
    lowest_flagged = thresholds[best]
    below = scores[scores < lowest_flagged]
    # Midway into the gap below the lowest flagged score: the same F1 here, and a margin on both
    # sides for new images, instead of a threshold sitting on one labelled score.
    threshold = (lowest_flagged + below.max()) / 2 if below.size else lowest_flagged
    return float(threshold), float(f1[best])


def holdout_folds(groups, folds=5, seed=0):
    """(N,) int hold-out fold of each row: source images dealt at random into `folds` folds, and
    each row in its source image's fold. groups: (N,) source image of each row."""
    unique = np.unique(groups)
    fold_of_group = np.random.default_rng(seed).permutation(len(unique)) % min(folds, len(unique))
    return fold_of_group[np.searchsorted(unique, groups)]


def holdout_scores(method, features, groups, output_size, folds=5, seed=0):
    """Scores of the training images from models fitted without them (k-fold over source images).

    In-sample scores are biased low; these are what a new normal image would get. features: the
    method's training features; groups: (N,) source image of each row (augmented copies share their
    source's group, so none leaks into its own fit). Only each image's plain view (its first row,
    first_rows) is scored: that is the view a new image is scored as, and its augmented copies
    would multiply the cost. A method fitted with the same folds (holdout_folds(groups, folds, seed))
    can carve its hold-out models out of that fit (PatchCore).
    Returns (image scores (n_images,), the largest pixel score of each image's held-out map
    (n_images,), or None for a method without maps), in np.unique(groups) order.
    """
    fold = holdout_folds(groups, folds, seed)
    plain = first_rows(groups)
    image_scores, pixel_maxima = np.empty(len(plain)), np.empty(len(plain))
    for k in np.unique(fold):
        held = fold[plain] == k
        model = method.holdout_model(features, fold != k)
        image_scores[held], maps = model.score(select_features(features, plain[held]), output_size)
        if maps is None:
            pixel_maxima = None
        else:
            pixel_maxima[held] = maps.reshape(len(maps), -1).max(axis=1)
    return image_scores, pixel_maxima


def conformal_threshold(scores, fpr):
    """The threshold at which a new normal image is flagged with probability at most `fpr`.

    scores: (n,) held-out scores of normal images, exchangeable with a new normal image's. The
    threshold is the order statistic s_(k), k = ceil((n + 1)(1 - fpr)) (split conformal): the new
    score's rank among the n + 1 is uniform, so it exceeds s_(k) with probability (n + 1 - k) / (n + 1)
    <= fpr (and equals it with probability 0 for continuous scores, so `score >= threshold` flags the
    same). Applied to each held-out image's largest pixel score, the same rule gives the pixel
    threshold: a normal image has any pixel at or above it with probability at most `fpr`.
    Returns (threshold, certified); when n < 1/fpr - 1 no order statistic certifies `fpr`
    (k > n): the largest score, and certified False.
    """
    ordered = np.sort(np.asarray(scores, np.float64).ravel())
    n = len(ordered)
    k = int(np.ceil(round((n + 1) * (1 - fpr), 9)))  # rounded: (n + 1)(1 - 1/(n + 1)) is n, not n + 1e-15
    if k > n:
        return float(ordered[-1]), False
    return float(ordered[max(k, 1) - 1]), True


ROBUST_Z_CUT = 3.5
CONTAMINATION_ROUNDS = 3


def robust_outliers(scores, cut=ROBUST_Z_CUT):
    """Which scores lie far above the bulk: (n,) -> (n,) bool.

    The modified z-score of Iglewicz and Hoaglin, 0.6745 (s - median) / MAD > cut (3.5, their
    recommendation): median and MAD ignore up to half the sample, so defective images hiding among
    the training images cannot mask themselves by inflating the spread as they would a mean and a
    standard deviation. Only the upper side counts: a defect scores high, never low.
    """
    scores = np.asarray(scores, np.float64)
    median = np.median(scores)
    mad = np.median(np.abs(scores - median))
    if mad == 0:
        return scores > median
    return 0.6745 * (scores - median) / mad > cut


def first_rows(groups):
    """Index of the first row of each source image, in the order of np.unique(groups) (the plain,
    unaugmented view: the fit lists it before its augmented copies)."""
    return np.unique(groups, return_index=True)[1]


def holdout_without_outliers(method, features, groups, output_size, contamination=None, seed=0,
                             rounds=CONTAMINATION_ROUNDS):
    """Held-out scores of the training images, after leaving out those that look defective.

    Each round computes held-out (k-fold) scores of the images still kept, one per source image (its
    plain view), and drops the outliers; the next round refits without them, so defects that the
    first fits had absorbed stand out. contamination: None (drop nothing), 'auto' (`robust_outliers`,
    until a round finds none; never more than half the images) or a fraction in (0, 0.5): that share
    of the images, the highest scored, dropped over the rounds in equal parts.
    Returns (kept: (N,) bool over rows, image scores (n_kept,), pixel maxima (n_kept,) or None, both
    in np.unique(groups[kept]) order, excluded: [(group, held-out score, round)] in exclusion order).
    """
    kept, excluded = np.ones(len(groups), bool), []
    n_images = len(np.unique(groups))
    if contamination not in (None, 'auto'):  # that share, dropped in parts of at least one image
        target = int(np.floor(contamination * n_images + 0.5))
        rounds = min(rounds, target)
    for round_ in range(1, rounds + 2):
        kept_features, kept_groups = select_features(features, kept), groups[kept]
        source = method.holdout_source(kept_features, holdout_folds(kept_groups, seed=seed))
        image_scores, pixel_maxima = holdout_scores(source, kept_features, kept_groups, output_size, seed=seed)
        image_groups = np.unique(kept_groups)
        if contamination is None or round_ > rounds:
            break
        if contamination == 'auto':
            flagged = np.nonzero(robust_outliers(image_scores))[0]
            flagged = flagged[np.argsort(-image_scores[flagged], kind='stable')][:n_images // 2 - len(excluded)]
        else:
            count = int(np.floor(target * round_ / rounds + 0.5)) - len(excluded)
            flagged = np.argsort(-image_scores, kind='stable')[:count]
        if not len(flagged):
            break
        excluded += [(int(image_groups[i]), float(image_scores[i]), round_) for i in flagged]
        kept &= ~np.isin(groups, image_groups[flagged])
    return kept, image_scores, pixel_maxima, excluded


# ----------------------------------------------------------------------------------------------
# The feature file
# ----------------------------------------------------------------------------------------------

def save_feature_file(path, meta, method):
    """Write the fitted `method` and `meta` (a JSON-able dict saying what produced it) atomically."""
    header = dict(meta, format=FEATURE_FILE_FORMAT, version=FEATURE_FILE_VERSION,
                  method=method.name, method_params=method.params)
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(header)), **method.state())
    atomic_write_bytes(path, buffer.getvalue())


# Largest feature file read, bytes of arrays once uncompressed (PatchCore banks of millions of patches fit).
MAX_FEATURE_FILE_BYTES = 4 << 30
MAX_META_CHARS = 1 << 20


def load_feature_file(path, max_bytes=MAX_FEATURE_FILE_BYTES):
    """Read a feature file -> (meta dict, fitted AnomalyMethod).

    Everything is checked before any array is read: the archive's members must be exactly the
    metadata and the arrays the method declares (`expected_state`), each with the declared shape
    and dtype as its .npy header states them, its stored size equal to what that header implies
    and all of them within `max_bytes`. Arrays are then read with allow_pickle=False (a pickle, or
    anything else, is refused, never executed) and must be finite. Any fault is one FeatureFileError
    "<path>: damaged feature file: <what>".
    """
    if not os.path.isfile(path):
        raise FeatureFileError(f'feature file not found: {path}')
    if not zipfile.is_zipfile(path):
        raise FeatureFileError(f'{path} is not a feature file of this tool (pickles are never loaded: '
                               'they can execute code); delete it or pass another --feat to refit')
    try:
        with zipfile.ZipFile(path) as archive:
            meta = _read_meta(archive)
            if meta.get('format') != FEATURE_FILE_FORMAT:
                raise FeatureFileError(f'{path} is not a feature file of this tool')
            if meta.get('version') != FEATURE_FILE_VERSION:
                raise FeatureFileError(f'{path} has feature file version {meta.get("version")}, '
                                       f'this tool reads version {FEATURE_FILE_VERSION}; refit it')
            method = _method_of(meta)
            arrays = _read_state(archive, method, max_bytes)
            method.load_state(arrays)
    except FeatureFileError:
        raise
    except _DamagedFile as e:
        raise FeatureFileError(f'{path}: damaged feature file: {e}') from None
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile, RuntimeError, RecursionError,
            NotImplementedError, TypeError, MemoryError) as e:
        what = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise FeatureFileError(f'{path}: damaged feature file: {what}') from None
    return meta, method


class _DamagedFile(ValueError):
    pass


def _read_meta(archive):
    names = archive.namelist()
    if len(names) != len(set(names)):
        raise _DamagedFile('duplicate archive members')
    if 'meta.npy' not in names:
        raise _DamagedFile('no meta member')
    with _open_member(archive, 'meta.npy') as f:
        shape, fortran, dtype = _npy_header(f, 'meta')
        if shape != () or dtype.kind != 'U' or dtype.itemsize > 4 * MAX_META_CHARS:
            raise _DamagedFile(f'meta is {dtype} {shape}, not a text of at most {MAX_META_CHARS} characters')
        _check_stored_size(archive.getinfo('meta.npy'), f, dtype.itemsize, 'meta')
        text = str(_read_data(f, shape, fortran, dtype))
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise _DamagedFile(f'meta is not JSON ({str(e)[:100]})') from None
    if not isinstance(meta, dict):
        raise _DamagedFile('meta is not a JSON object')
    return meta


def _method_of(meta):
    """The method named by `meta`, built from its params (checked by `expected_state`)."""
    if meta.get('method') not in METHODS:
        raise FeatureFileError(f'feature file fitted with an unknown method {meta.get("method")!r}')
    params = meta.get('method_params')
    if not isinstance(params, dict):
        raise _DamagedFile('method_params is not an object')
    method = METHODS[meta['method']](**params)
    try:
        method.expected_state()
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise _DamagedFile(f'{method.name} parameters: {e}') from None
    return method


def _open_member(archive, name):
    info = archive.getinfo(name)
    if info.flag_bits & 0x1:
        raise _DamagedFile(f'member {name} is encrypted')
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _DamagedFile(f'member {name} uses compression type {info.compress_type}')
    return archive.open(info)


def _npy_header(f, name):
    """(shape, fortran_order, dtype) from the .npy header at the start of the open member `f` (a few
    hundred bytes read); an object dtype (pickles) is refused here."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        header = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        header = np.lib.format.read_array_header_2_0(f)
    else:
        raise _DamagedFile(f'member {name} has .npy version {version}')
    if header[2].hasobject:
        raise _DamagedFile(f'member {name} holds Python objects (never loaded: they can execute code)')
    return header


def _read_data(f, shape, fortran, dtype):
    """The array data following the header in `f`, exactly as many bytes as shape and dtype take."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    data = bytearray(nbytes)
    view, filled = memoryview(data), 0
    while filled < nbytes:
        count = f.readinto(view[filled:])
        if not count:
            raise _DamagedFile('array data cut short')
        filled += count
    return np.frombuffer(data, dtype).reshape(shape, order='F' if fortran else 'C')


def _check_stored_size(info, f, nbytes, name):
    if info.file_size != f.tell() + nbytes:
        raise _DamagedFile(f'member {name} stores {info.file_size} bytes, its header implies {f.tell() + nbytes}')


def _read_state(archive, method, max_bytes):
    """The arrays `method` declares (`expected_state`) from `archive`, after checking every member."""
    expected = method.expected_state()
    members = {name[:-len('.npy')] for name in archive.namelist() if name.endswith('.npy')} - {'meta'}
    unexpected = sorted(set(archive.namelist()) - {f'{name}.npy' for name in expected} - {'meta.npy'})
    missing = sorted(set(expected) - members)
    if unexpected or missing:
        raise _DamagedFile('; '.join(part for part in (
            f'unexpected members {", ".join(unexpected)[:200]}' if unexpected else '',
            f'missing arrays {", ".join(missing)[:200]}' if missing else '') if part) + f' for method {method.name}')
    sizes, total = {}, 0
    for name, (shape, dtype) in expected.items():
        with _open_member(archive, f'{name}.npy') as f:
            stored_shape, _, stored_dtype = _npy_header(f, name)
            if stored_dtype.kind != np.dtype(dtype).kind or stored_dtype.itemsize != np.dtype(dtype).itemsize:
                raise _DamagedFile(f'array {name} is {stored_dtype}, the method needs {dtype}')
            if len(stored_shape) != len(shape) or not all(
                    n >= 1 or (isinstance(w, str) and w.endswith('*')) for n, w in zip(stored_shape, shape)):
                raise _DamagedFile(f'array {name} has shape {stored_shape}, the method needs {shape}')
            for stored, wanted in zip(stored_shape, shape):
                if isinstance(wanted, str):
                    wanted = sizes.setdefault(wanted, stored)
                if stored != wanted:
                    raise _DamagedFile(f'array {name} has shape {stored_shape}, the method needs '
                                       f'{tuple(sizes.get(n, n) for n in shape)}')
            nbytes = int(np.prod(stored_shape, dtype=object)) * stored_dtype.itemsize
            _check_stored_size(archive.getinfo(f'{name}.npy'), f, nbytes, name)
            total += nbytes
    if total > max_bytes:
        raise _DamagedFile(f'arrays of {total / 2**20:.0f} MiB, above the limit of {max_bytes / 2**20:.0f} MiB')
    arrays = {}
    for name in expected:
        with _open_member(archive, f'{name}.npy') as f:
            array = _read_data(f, *_npy_header(f, name))
        if not np.isfinite(array).all():
            raise _DamagedFile(f'array {name} holds values that are not finite')
        arrays[name] = array.astype(np.dtype(expected[name][1]).newbyteorder('='), copy=False)
    return arrays
