"""Statistics: a feature becomes a score here, a score a verdict, and fitted state a feature file.

- `MahalanobisAD`: one Gaussian per network level over globally pooled features (mean and
  Ledoit-Wolf covariance); the image score is the sum over levels of the Mahalanobis distances
  (Rippel et al., 2020).
- `PixelGaussian`: one Gaussian per feature-map position over several levels resampled to one
  grid (PaDiM-style); gives a per-pixel distance map for localization.
- thresholds: F1-optimal from labelled test images, or held-out training scores when there is
  no ground truth.
- the feature file: an .npz archive (whatever its extension) read with allow_pickle=False, so
  loading it cannot execute code.
"""
import io
import json
import os
import zipfile

import cv2
import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.metrics import precision_recall_curve

from model_utils import atomic_write_bytes

FEATURE_FILE_FORMAT = 'mahalanobisad-features'
FEATURE_FILE_VERSION = 1
PIXEL_MAP_SIGMA = 4.0  # Gaussian smoothing of the upsampled map, pixels (as in PaDiM)


class FeatureFileError(ValueError):
    """A feature file cannot be used; the message says why."""


def pool_features(feature_maps):
    """[(N, C_l, h_l, w_l), ...] -> [(N, C_l), ...] float32 by global average pooling."""
    return [m.reshape(m.shape[0], m.shape[1], -1).mean(axis=2) for m in feature_maps]


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


def choose_pixel_levels(map_sizes, input_size):
    """Indices of the outputs used for localization: those with a stride of 4 to 16 pixels.

    Deeper maps are too coarse to localise; shallower ones too generic (and large).
    """
    return [i for i, size in enumerate(map_sizes) if input_size / 16 <= size <= input_size / 4]


class PixelGaussian:
    """A Gaussian per position of a feature grid, over the channels of several levels.

    levels: indices of the network outputs used; grid: side of the common grid (the coarsest
    level's); maps of finer levels are average-pooled onto it.
    Fitted state: mean_ (P, D) and precision_ (P, D, D) float32, P = grid**2 positions,
    D = total channels of the levels.
    """

    def __init__(self, levels, grid, regularization=0.01, mean=None, precision=None):
        self.levels = list(levels)
        self.grid = int(grid)
        self.regularization = regularization  # added to the covariance diagonal, as in PaDiM
        self.mean_, self.precision_ = mean, precision

    def embed(self, feature_maps):
        """[(N, C_l, h_l, w_l), ...] (all network outputs) -> (P, N, D) float32 embeddings."""
        parts = []
        for level in self.levels:
            maps = feature_maps[level]
            n, c, h, w = maps.shape
            if (h, w) != (self.grid, self.grid):
                maps = np.matmul(np.matmul(_pooling_matrix(h, self.grid).T, maps), _pooling_matrix(w, self.grid))
            parts.append(maps.reshape(n, c, -1))
        return np.concatenate(parts, axis=1).transpose(2, 0, 1).astype(np.float32)

    def fit(self, embeddings):
        """embeddings: (P, N, D) from `embed` for N training images."""
        n = embeddings.shape[1]
        if n < 2:
            raise ValueError('need at least 2 training images')
        mean = embeddings.mean(axis=1, dtype=np.float64)
        centred = embeddings - mean[:, None, :].astype(np.float32)
        covariance = np.matmul(centred.transpose(0, 2, 1), centred, dtype=np.float64) / (n - 1)
        covariance += self.regularization * np.eye(covariance.shape[-1])
        self.mean_ = mean.astype(np.float32)
        self.precision_ = np.linalg.inv(covariance).astype(np.float32)
        return self

    def score_maps(self, embeddings, output_size):
        """(P, N, D) -> (N, output_size, output_size) float32 distance maps, upsampled and smoothed."""
        centred = embeddings - self.mean_[:, None, :]
        squared = np.einsum('pnd,pnd->pn', np.matmul(centred, self.precision_), centred)
        grids = np.sqrt(np.maximum(squared, 0)).T.reshape(-1, self.grid, self.grid)
        return upsample_and_smooth(grids, output_size)


def _pooling_matrix(size, grid):
    """(size, grid) matrix whose product averages a length-`size` axis onto `grid` cells (area
    weights, exact for fractional cells). Two matrix products pool a map 7x faster than reshaping."""
    edges = np.linspace(0, size, grid + 1)
    pixel = np.arange(size)
    overlap = np.clip(np.minimum(pixel[:, None] + 1, edges[None, 1:]) - np.maximum(pixel[:, None], edges[None, :-1]), 0, None)
    return (overlap / overlap.sum(axis=0)).astype(np.float32)


def upsample_and_smooth(grids, output_size, sigma=PIXEL_MAP_SIGMA):
    """(N, g, g) -> (N, S, S): bilinear upsampling then Gaussian smoothing.

    The batch is laid out as image channels so OpenCV treats it in one call per 512 maps.
    """
    out = np.empty((len(grids), output_size, output_size), np.float32)
    for start in range(0, len(grids), 512):
        chunk = np.ascontiguousarray(grids[start:start + 512].transpose(1, 2, 0), np.float32)
        resized = cv2.resize(chunk, (output_size, output_size), interpolation=cv2.INTER_LINEAR)
        smoothed = cv2.GaussianBlur(resized, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
        out[start:start + 512] = smoothed.reshape(output_size, output_size, -1).transpose(2, 0, 1)
    return out


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


def holdout_scores(image_features, embeddings, groups, pixel_grid, output_size, folds=5, seed=0):
    """Scores of training images from models fitted without them (k-fold over source images).

    In-sample distances are biased low; these are what a new normal image would get.
    image_features: [(N, C_l), ...]; embeddings: (P, N, D) or None, on a pixel_grid**2 grid; groups: (N,) source image of
    each row (augmented copies share their source's group, so none leaks into its own fit).
    Returns (image_scores (N,), pixel_maps (N, S, S) or None).
    """
    unique = np.unique(groups)
    fold_of_group = np.random.default_rng(seed).permutation(len(unique)) % min(folds, len(unique))
    fold = fold_of_group[np.searchsorted(unique, groups)]
    image_scores = np.empty(len(groups))
    pixel_maps = None if embeddings is None else np.empty((len(groups), output_size, output_size), np.float32)
    for k in np.unique(fold):
        held, kept = fold == k, fold != k
        model = MahalanobisAD().fit([f[kept] for f in image_features])
        image_scores[held] = model.score([f[held] for f in image_features])
        if embeddings is not None:
            pixel_model = PixelGaussian([], pixel_grid).fit(embeddings[:, kept])
            pixel_maps[held] = pixel_model.score_maps(embeddings[:, held], output_size)
    return image_scores, pixel_maps


# ----------------------------------------------------------------------------------------------
# The feature file
# ----------------------------------------------------------------------------------------------

def save_feature_file(path, meta, image_model, pixel_model):
    """Write the fitted models and `meta` (a JSON-able dict saying what produced them) atomically."""
    arrays = {'meta': np.array(json.dumps(dict(meta, format=FEATURE_FILE_FORMAT, version=FEATURE_FILE_VERSION)))}
    for level, (mean, precision) in enumerate(zip(image_model.means_, image_model.precisions_)):
        arrays[f'image_mean_{level}'] = mean
        arrays[f'image_precision_{level}'] = precision
    if pixel_model is not None:
        arrays['pixel_mean'] = pixel_model.mean_
        arrays['pixel_precision'] = pixel_model.precision_
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_feature_file(path):
    """Read a feature file -> (meta dict, MahalanobisAD, PixelGaussian or None).

    Uses np.load(allow_pickle=False): a pickle (or anything else) is refused, never executed.
    """
    if not os.path.isfile(path):
        raise FeatureFileError(f'feature file not found: {path}')
    if not zipfile.is_zipfile(path):
        raise FeatureFileError(f'{path} is not a feature file of this tool (pickles are never loaded: '
                               'they can execute code); delete it or pass another --feat to refit')
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive['meta']))
            if meta.get('format') != FEATURE_FILE_FORMAT:
                raise FeatureFileError(f'{path} is not a feature file of this tool')
            if meta.get('version') != FEATURE_FILE_VERSION:
                raise FeatureFileError(f'{path} has feature file version {meta.get("version")}, '
                                       f'this tool reads version {FEATURE_FILE_VERSION}; refit it')
            n_levels = len(meta['image_levels'])
            image_model = MahalanobisAD([archive[f'image_mean_{l}'] for l in range(n_levels)],
                                        [archive[f'image_precision_{l}'] for l in range(n_levels)])
            pixel_model = None
            if meta.get('pixel_levels'):
                pixel_model = PixelGaussian(meta['pixel_levels'], meta['pixel_grid'],
                                            mean=archive['pixel_mean'], precision=archive['pixel_precision'])
    except FeatureFileError:
        raise
    except (ValueError, KeyError, OSError, zipfile.BadZipFile, json.JSONDecodeError, TypeError) as e:
        raise FeatureFileError(f'{path} is damaged or not a feature file of this tool: {e}') from None
    return meta, image_model, pixel_model
