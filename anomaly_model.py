"""The methods: where a feature becomes a score and a heat map.

Each method is an `AnomalyMethod` over the same backbone feature maps (`METHODS`), with its own
options (`options`, their defaults, the flags that set them) and its fitted state in trailing-
underscore attributes, as scikit-learn estimators keep theirs:
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
Feature maps become patches in feature_maps, nearest neighbours are searched in nearest_neighbours;
held-out scores (holdout), thresholds (thresholds) and the feature file (feature_file) are written
once for every method over this interface. A new method is a class here and its graph in export_onnx.
"""
import dataclasses

import numpy as np
from scipy.ndimage import uniform_filter

import leave_out
from errors import FeatureFileError, MethodError
from feature_maps import embed_patches, patch_grid, pool_features, smoothing_matrix, upsample_and_smooth
from nearest_neighbours import (NearestPatchIndex, chunked_coreset, coreset_chunk_share, ivf_centroids,
                                ivf_list_count, nearest_distances, squared_distances)


# ----------------------------------------------------------------------------------------------
# Gaussians
# ----------------------------------------------------------------------------------------------

class MahalanobisAD:
    """Per-level Gaussians over pooled features; the image score is the summed distance.

    Fitted state: means_[l] (C_l,), precisions_[l] (C_l, C_l), float32: sklearn's LedoitWolf estimated in
    float64 (leave_out.ledoit_wolf_precision), stored and applied in float32, which moves scores by about
    1e-7 relative and halves the cost. Estimated from the rows in the eigenbasis of their span, so a fit
    on all the training rows again (what teaching more images does) costs a Gram matrix, not a
    C x C eigendecomposition per level. bases_[l]: that eigenbasis (leave_out.Basis), kept in memory
    after a fit for the held-out distances of the same rows (None: a loaded model; made again there).
    """

    def __init__(self, means=None, precisions=None):
        self.means_ = means or []
        self.precisions_ = precisions or []
        self.bases_ = None

    def fit(self, train_features):
        """train_features: [(N, C_l) float, ...] pooled features of the N training images."""
        self.bases_ = [leave_out.spectral_basis(features) for features in train_features]
        estimates = [leave_out.ledoit_wolf_precision(features, basis)
                     for features, basis in zip(train_features, self.bases_)]
        self.means_ = [mean.astype(np.float32) for mean, _ in estimates]
        self.precisions_ = [precision.astype(np.float32) for _, precision in estimates]
        return self

    def leave_out_distances(self, train_features, groups):
        """[(N, C_l), ...] the rows this model was fitted on -> (G,) each image's summed distance under the
        Gaussians fitted without it (leave_out.ledoit_wolf_distances, on the fit's eigenbases)."""
        bases = [basis if basis.count == len(features) else None
                 for basis, features in zip(self.bases_, train_features)] if self.bases_ else [None] * len(train_features)
        return sum(leave_out.ledoit_wolf_distances(features, groups, basis)
                   for features, basis in zip(train_features, bases))

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
    """A Gaussian per patch position, over D channels: mean and unbiased covariance + regularization I.

    Fitted state: mean_ (P, D) and precision_ (P, D, D) float32, what scores; basis_ (leave_out.Basis,
    float64): the eigenbasis of the scatter of the first basis_.count training rows, made by the held-out
    distances (which need it anyway) and kept, so that `update` with more rows costs D^2 per row and
    position (Woodbury's identity) instead of an inversion's D^3 per position; a new basis is made once the
    rows added after it exceed REBASE_SHARE of D (their cost then grows as their square).
    """
    REBASE_SHARE = 0.25

    def __init__(self, regularization=0.01, mean=None, precision=None, basis=None):
        self.regularization = regularization  # added to the covariance diagonal, as in PaDiM
        self.mean_, self.precision_, self.basis_ = mean, precision, basis

    def fit(self, patches):
        """patches: (N, P, D) for N training images."""
        if patches.shape[0] < 2:
            raise ValueError('need at least 2 training images')
        self.mean_ = patches.mean(axis=0, dtype=np.float64).astype(np.float32)
        self.precision_ = np.empty(patches.shape[1:] + patches.shape[-1:], np.float32)
        for positions, rows in _position_chunks(patches):
            centred = rows - rows.mean(axis=1, keepdims=True)
            covariance = np.swapaxes(centred, 1, 2) @ centred / (len(patches) - 1)
            covariance[:, np.arange(rows.shape[-1]), np.arange(rows.shape[-1])] += self.regularization
            self.precision_[positions] = np.linalg.inv(covariance)
        self.basis_ = None
        return self

    def update(self, patches):
        """The Gaussians of all the training rows patches (N, P, D), the first basis_.count of them those
        the basis was made from (the later ones added since) -> self. Equal to fit(patches) up to float64
        rounding."""
        extra = len(patches) - (self.basis_.count if self.basis_ is not None else 0)
        if self.basis_ is None or extra < 0 or extra + 1 > max(1, self.REBASE_SHARE * patches.shape[-1]):
            self.basis_ = _spectral_basis(patches)
        self.mean_ = patches.mean(axis=0, dtype=np.float64).astype(np.float32)
        self.precision_ = np.empty(patches.shape[1:] + patches.shape[-1:], np.float32)
        for positions, rows, basis in self._chunks(patches):
            self.precision_[positions] = leave_out.regularized_precision(rows, self.regularization, basis)
        return self

    def leave_out_distances(self, patches, groups):
        """patches (N, P, D) of the N training rows this Gaussian was fitted on (or updated with) -> (G, P)
        each image's distances under the Gaussians fitted without it (leave_out.regularized_distances).
        Makes the basis from all the rows where there is none."""
        if self.basis_ is None:
            self.basis_ = _spectral_basis(patches)
        return np.concatenate([leave_out.regularized_distances(rows, groups, self.regularization, basis)
                               for _, rows, basis in self._chunks(patches)]).T

    def _chunks(self, patches):
        """_position_chunks with each chunk's part of the basis."""
        b = self.basis_
        for positions, rows in _position_chunks(patches):
            yield positions, rows, leave_out.Basis(b.vectors[positions], b.values[positions], b.count,
                                                   b.mean[positions])

    def distances(self, patches):
        """(N, P, D) -> (N, P) Mahalanobis distance of each patch to its position's Gaussian."""
        centred = patches.transpose(1, 0, 2) - self.mean_[:, None, :]
        squared = np.einsum('pnd,pnd->pn', np.matmul(centred, self.precision_), centred)
        return np.sqrt(np.maximum(squared, 0)).T


def _by_position(patches):
    """(N, P, D) -> (P, N, D) float64, contiguous (batched products are slow on strided views)."""
    return np.ascontiguousarray(np.asarray(patches).transpose(1, 0, 2), np.float64)


def _spectral_basis(patches):
    """leave_out.spectral_basis of patches (N, P, D) by position, made in chunks of positions."""
    parts = [leave_out.spectral_basis(rows) for _, rows in _position_chunks(patches)]
    return leave_out.Basis(np.concatenate([b.vectors for b in parts]), np.concatenate([b.values for b in parts]),
                           len(patches), np.concatenate([b.mean for b in parts]))


def _position_chunks(patches, chunk=16):
    """(positions (slice), their rows (p, N, D) float64) of patches (N, P, D), in chunks of positions:
    bounded memory, and temporaries small enough to be reused instead of paged in afresh (which costs as
    much as the arithmetic for whole (P, D, D) float64 arrays)."""
    for start in range(0, patches.shape[1], chunk):
        positions = slice(start, start + chunk)
        yield positions, _by_position(patches[:, positions])


# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Option:
    """An option a user sets on a method: its key in the method's params, the flag that sets it (the
    command line's --flag and the Detector's keyword), its default, its kind ('count': an integer >= 1;
    'fraction': a number in (0, 1]) and what it does."""
    key: str
    flag: str
    default: object
    kind: str
    help: str

    def check(self, value):
        """value, if it is of this option's kind -> int or float; else ValueError saying what it must be."""
        if self.kind == 'count':
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f'{self.flag} must be an integer >= 1, got {value!r}')
            return int(value)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 < value <= 1:
            raise ValueError(f'{self.flag} must be in (0, 1], got {value!r}')
        return float(value)


class AnomalyMethod:
    """One detection method over backbone feature maps.

    configure(shapes, input_size): choose levels for this backbone from its outputs' (C, h, w)
    shapes and the input side (raises MethodError if none fit).
    features(feature_maps) -> {name: (N, ...) array}: what the method keeps of a batch.
    fit(features): estimate the state from training features.
    score(features, output_size) -> (image scores (N,), anomaly maps (N, S, S) float32 or None).
    holdout_scores(features, groups, output_size): the held-out scores of the training images (below).
    `params` rebuilds the configured method, `state()` / `load_state()` hold the fitted arrays.
    options: the Options a user sets; fixed_params: the other params, set here; seeded: whether the
    params hold the detector's seed. screened_by: the method whose held-out scores find defective
    training images (contamination), None for this one's own.
    """
    name = ''
    options = ()
    fixed_params = {}
    seeded = False
    screened_by = None
    labelled_ = None  # {name: (K, ...) float32}: features of K labelled defect images (Detector.add_defects)
    # The Gaussians keep their training rows (training_ {name: (N, ...)}, training_groups_ (N,) int64: each
    # row's image, 0 .. n_images - 1 in training order), so that partial_fit estimates them again exactly
    # and every image's held-out score follows the model it is held out of (Detector.partial_fit).
    keeps_training = False
    training_ = None
    training_groups_ = None

    def __init__(self, **params):
        self.params = params

    @classmethod
    def default_params(cls, seed=0, **options):
        """The params of an unconfigured method: each Option from `options` (by flag) or its default,
        the fixed params, and the seed where the method draws at random."""
        params = {o.key: options.get(o.flag, o.default) for o in cls.options}
        params.update(cls.fixed_params)
        if cls.seeded:
            params['seed'] = seed
        return params

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

    def feature_state(self):
        """{name: (shape of one row, dtype)} of what `features` returns, from `params` alone."""
        raise NotImplementedError

    def labelled_features(self):
        """labelled_, or none (K = 0) in the shapes feature_state declares."""
        if self.labelled_ is not None:
            return self.labelled_
        return {name: np.zeros((0,) + shape, dtype) for name, (shape, dtype) in self.feature_state().items()}

    def holdout_scores(self, features, groups, output_size):
        """Each training image scored by this method as fitted on all the other images: leave one image
        out, exactly, without refitting (leave_out for the Gaussians; the image's own rows left out of the
        nearest-neighbour search for SPADE and PatchCore).

        features, groups (N,): the rows this method was fitted on and the image each comes from (an
        image's augmented copies are left out with it); only each image's first row, its plain view (the
        view a new image is scored as), is scored. -> (image scores (G,), the largest value of each
        held-out map (G,) or None for a method without maps), in np.unique(groups) order.
        """
        raise NotImplementedError

    def fold_models(self, features, fold):
        """(k, the method fitted on the rows `features` outside fold k) for each fold k of fold (N,) int:
        what contamination screening scores fold k's images with (holdout.screening_scores). A fit per
        fold; PatchCore carves its folds' models out of one fit."""
        for k in np.unique(fold):
            yield k, type(self)(**self.params).fit(select_features(features, fold != k))

    def keep_training(self, features, groups):
        """Keep the rows the method was fitted on (keeps_training methods) and their images (N,): what
        partial_fit adds to -> self."""
        self.training_ = dict(features)
        self.training_groups_ = np.unique(groups, return_inverse=True)[1].astype(np.int64)
        return self

    def partial_fit(self, features, groups):
        """Add the rows `features` (good images; groups (M,): each row's image) to the fitted state -> self.
        The Gaussians (keeps_training) add them to their training rows and are estimated again, exactly,
        in time linear in the rows (see holdout_scores for the held-out scores then); SPADE appends;
        PatchCore continues its coreset (their held-out scores: added_holdout_scores)."""
        raise NotImplementedError

    def _add_training(self, features, groups):
        """training_ with these rows appended, their images numbered after the kept ones."""
        if self.training_ is None:
            raise MethodError(f'this {self.name} detector does not keep its training features (fitted at '
                              'several input sizes): fit it again with the images added to the training folder')
        first = int(self.training_groups_.max()) + 1 if len(self.training_groups_) else 0
        self.training_ = concatenate_features([self.training_, features])
        self.training_groups_ = np.concatenate([self.training_groups_,
                                                first + np.unique(groups, return_inverse=True)[1]]).astype(np.int64)

    def added_holdout_scores(self, features, groups, output_size):
        """The nearest-neighbour methods' holdout_scores of the images partial_fit just added (features,
        groups: their rows), each under the updated method without it -> (image scores (G,), map maxima
        (G,) or None). Their earlier images' scores stay as they were: the bank only grew, so those can only
        have fallen, and the kept ones err on the side of fewer false alarms."""
        raise NotImplementedError

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


def first_rows(groups):
    """Index of the first row of each source image, in the order of np.unique(groups) (the plain,
    unaugmented view: the fit lists it before its augmented copies)."""
    return np.unique(groups, return_index=True)[1]


def _map_maxima(distances, grid, output_size, chunk=64):
    """Patch distances (G, P) -> the largest value of each image's smoothed map (G,), in chunks (bounded
    memory). The maps as K m K^T (smoothing_matrix: upsample_and_smooth's to float32 rounding), one batched
    product instead of OpenCV's resize and blur: a tenth of the time for the hundreds of held-out maps a
    fit, or teaching a detector, computes."""
    k = smoothing_matrix(grid, output_size)
    grids = np.asarray(distances, np.float32).reshape(-1, grid, grid)
    return np.concatenate([(k @ grids[i:i + chunk] @ k.T).reshape(-1, output_size * output_size).max(axis=1)
                           for i in range(0, len(grids), chunk)])


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _gaussian_state(positions, dims):
    """Declared state of a PixelGaussian over `positions` patches of `dims` channels: mean and precision,
    and the kept basis (R columns; R = 0 and count 0 where none is kept)."""
    return {'pixel_mean': ((positions, dims), 'float32'), 'pixel_precision': ((positions, dims, dims), 'float32'),
            'pixel_basis_vectors': ((positions, dims, 'R*'), 'float64'), 'pixel_basis_values': ((positions, 'R*'), 'float64'),
            'pixel_basis_mean': ((positions, dims), 'float64'), 'pixel_basis_count': ((), 'int64')}


def _gaussian_arrays(gaussian, keep_basis):
    """The arrays _gaussian_state declares, of a fitted PixelGaussian; its basis where keep_basis (only
    teaching uses it: it is kept with the training rows)."""
    basis = gaussian.basis_ if keep_basis else None
    positions, dims = gaussian.mean_.shape
    if basis is None:
        basis = leave_out.Basis(np.zeros((positions, dims, 0)), np.zeros((positions, 0)), 0, np.zeros((positions, dims)))
    return dict(pixel_mean=gaussian.mean_, pixel_precision=gaussian.precision_, pixel_basis_vectors=basis.vectors,
                pixel_basis_values=basis.values, pixel_basis_mean=basis.mean,
                pixel_basis_count=np.array(basis.count, np.int64))


def _load_gaussian(arrays):
    count, vectors = int(arrays['pixel_basis_count']), arrays['pixel_basis_vectors']
    if count == 1 or count < 0 or (count == 0) != (vectors.shape[-1] == 0) or vectors.shape[-1] > vectors.shape[-2] \
            or np.any(arrays['pixel_basis_values'] < 0):
        raise FeatureFileError(f'the Gaussians\' basis of {count} rows with {vectors.shape[-1]} vectors of '
                               f'{vectors.shape[-2]} channels is not an eigenbasis of a scatter matrix')
    basis = leave_out.Basis(vectors, arrays['pixel_basis_values'], count, arrays['pixel_basis_mean']) if count else None
    return PixelGaussian(mean=arrays['pixel_mean'], precision=arrays['pixel_precision'], basis=basis)


class MahalanobisMethod(AnomalyMethod):
    name = 'mahalanobis'
    keeps_training = True
    # Its image score pools each level over the whole image, which averages a small defect away:
    # PaDiM's per-position scores on the same backbone outputs find the defective training images
    # (metal_nut, 22 planted: 20 found against 17 by its own scores; docs/accuracy.md, "contaminated training folders").
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

    def fit(self, features):
        self.image_model_ = MahalanobisAD().fit([features[f'pooled{l}'] for l in self.params['image_levels']])
        self.pixel_model_ = PixelGaussian().fit(features['patches']) if self.localizes else None
        return self

    def score(self, features, output_size):
        scores = self.image_model_.score([features[f'pooled{l}'] for l in self.params['image_levels']])
        if self.pixel_model_ is None:
            return scores, None
        grid = self.params['grid']
        return scores, upsample_and_smooth(self.pixel_model_.distances(features['patches']).reshape(-1, grid, grid),
                                           output_size)

    def holdout_scores(self, features, groups, output_size):
        scores = self.image_model_.leave_out_distances([features[f'pooled{l}'] for l in self.params['image_levels']],
                                                       groups)
        if self.pixel_model_ is None:
            return scores, None
        patches = self.pixel_model_.leave_out_distances(features['patches'], groups)
        return scores, _map_maxima(patches, self.params['grid'], output_size)

    def partial_fit(self, features, groups):
        self._add_training(features, groups)
        self.image_model_ = MahalanobisAD().fit([self.training_[f'pooled{l}'] for l in self.params['image_levels']])
        if self.pixel_model_ is not None:
            self.pixel_model_.update(self.training_['patches'])
        return self

    def state(self):
        arrays = {}
        for l, mean, precision in zip(self.params['image_levels'], self.image_model_.means_,
                                      self.image_model_.precisions_):
            arrays[f'image_mean_{l}'], arrays[f'image_precision_{l}'] = mean, precision
        if self.pixel_model_ is not None:
            arrays.update(_gaussian_arrays(self.pixel_model_, self.training_ is not None))
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

    def feature_state(self):
        shapes = self.params['feature_shapes']
        state = {f'pooled{l}': ((shapes[l][0],), 'float32') for l in self.params['image_levels']}
        if self.params.get('pixel_levels'):
            state['patches'] = ((self._grid() ** 2, self._channels(self.params['pixel_levels'])), 'float32')
        return state

    def load_state(self, arrays):
        levels = self.params['image_levels']
        self.image_model_ = MahalanobisAD([arrays[f'image_mean_{l}'] for l in levels],
                                          [arrays[f'image_precision_{l}'] for l in levels])
        self.pixel_model_ = _load_gaussian(arrays) if self.localizes else None
        return self


class PadimMethod(AnomalyMethod):
    """params: dims (channels kept, at random), seed; configured: levels, grid, channels.
    Fitted state: gaussian_, the PixelGaussian over the kept channels."""
    name = 'padim'
    options = (Option('dims', 'padim_dims', 200, 'count', 'padim: channels kept (random, seeded)'),)
    seeded = True
    localizes = True
    keeps_training = True

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

    def fit(self, features):
        self.gaussian_ = PixelGaussian().fit(features['patches'])
        return self

    def holdout_scores(self, features, groups, output_size):
        maxima = _map_maxima(self.gaussian_.leave_out_distances(features['patches'], groups), self.params['grid'],
                             output_size)
        return maxima, maxima  # the image score is the map's maximum

    def partial_fit(self, features, groups):
        self._add_training(features, groups)
        self.gaussian_.update(self.training_['patches'])
        return self

    def score(self, features, output_size):
        grid = self.params['grid']
        maps = upsample_and_smooth(self.gaussian_.distances(features['patches']).reshape(-1, grid, grid), output_size)
        return maps.reshape(len(maps), -1).max(axis=1), maps

    def state(self):
        return _gaussian_arrays(self.gaussian_, self.training_ is not None)

    def expected_state(self):
        total = self._channels(self.params.get('levels'))
        channels = self._param('channels', lambda c: isinstance(c, list) and c and all(_is_int(i) for i in c)
                               and c == sorted(set(c)) and 0 <= c[0] and c[-1] < total,
                               f'a sorted subset of the {total} channels')
        return _gaussian_state(self._grid() ** 2, len(channels))

    def feature_state(self):
        return {'patches': ((self._grid() ** 2, len(self.params['channels'])), 'float32')}

    def load_state(self, arrays):
        self.gaussian_ = _load_gaussian(arrays)
        return self


class SpadeMethod(AnomalyMethod):
    """params: k (nearest training images); configured: image_level (deepest), levels, grid.
    Fitted state: train_pooled_ (N, C) and train_patches_ (N, P, D), the training images' features."""
    name = 'spade'
    options = (Option('k', 'spade_k', 50, 'count', 'spade: nearest training images'),)
    localizes = True

    def configure(self, shapes, input_size):
        super().configure(shapes, input_size)
        levels, grid = patch_grid(shapes, input_size, required_by=self.name)
        self.params.update(image_level=len(shapes) - 1, levels=levels, grid=grid)

    def features(self, feature_maps):
        return {'pooled': pool_features([feature_maps[self.params['image_level']]])[0],
                'patches': embed_patches(feature_maps, self.params['levels'], self.params['grid'])}

    def fit(self, features):
        self.train_pooled_, self.train_patches_ = features['pooled'], features['patches']
        return self

    def score(self, features, output_size):
        scores, distances = self._nearest(features['pooled'], features['patches'])
        grid = self.params['grid']
        return scores, upsample_and_smooth(distances.reshape(-1, grid, grid), output_size)

    def holdout_scores(self, features, groups, output_size):
        plain = first_rows(groups)
        own = groups[plain][:, None] == groups[None, :]  # each held-out image's own rows, left out
        scores, distances = self._nearest(features['pooled'][plain], features['patches'][plain], own)
        return scores, _map_maxima(distances, self.params['grid'], output_size)

    def partial_fit(self, features, groups):
        self.train_pooled_ = np.concatenate([self.train_pooled_, features['pooled']])
        self.train_patches_ = np.concatenate([self.train_patches_, features['patches']])
        return self

    def added_holdout_scores(self, features, groups, output_size):
        plain = first_rows(groups)
        own = np.zeros((len(plain), len(self.train_pooled_)), bool)  # the added rows are the last ones
        own[:, len(own[0]) - len(groups):] = groups[plain][:, None] == groups[None, :]
        scores, distances = self._nearest(features['pooled'][plain], features['patches'][plain], own)
        return scores, _map_maxima(distances, self.params['grid'], output_size)

    def _nearest(self, pooled, patches, excluded=None):
        """(image scores (Q,), patch distances (Q, P)) of Q images: the mean distance to the k nearest
        training rows by pooled features, and each patch's distance to the nearest patch of those rows.
        excluded (Q, N) bool: training rows a query may not use."""
        distances = np.sqrt(np.maximum(squared_distances(pooled, self.train_pooled_), 0))
        if excluded is not None:
            distances[excluded] = np.inf
        k = min(self.params['k'], int(np.isfinite(distances).sum(axis=1).min()))
        nearest = np.argpartition(distances, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(distances, nearest, axis=1).mean(axis=1)
        # Each image has its own gallery (the patches of its k nearest training rows), so the pixel
        # search runs per image, each one a chunked matrix product.
        d = self.train_patches_.shape[-1]
        return scores, np.stack([nearest_distances(query, self.train_patches_[gallery].reshape(-1, d))[0]
                                 for query, gallery in zip(patches, nearest)])

    def state(self):
        return {'train_pooled': self.train_pooled_, 'train_patches': self.train_patches_}

    def expected_state(self):
        self._param('k', lambda k: _is_int(k) and k > 0, 'a positive integer')
        pooled = self._channels([self.params.get('image_level')])
        return {'train_pooled': (('N', pooled), 'float32'),
                'train_patches': (('N', self._grid() ** 2, self._channels(self.params.get('levels'))), 'float32')}

    def feature_state(self):
        return {'pooled': ((self.params['feature_shapes'][self.params['image_level']][0],), 'float32'),
                'patches': ((self._grid() ** 2, self._channels(self.params['levels'])), 'float32')}

    def load_state(self, arrays):
        self.train_pooled_, self.train_patches_ = arrays['train_pooled'], arrays['train_patches']
        return self


class PatchCoreMethod(AnomalyMethod):
    """params: coreset_ratio, projection_dims, neighbours (re-weighting), seed; configured: levels
    (the deepest outputs of stride 8 and of stride 16), grid (the stride-8 map's side).

    Fitted state: bank_ (B, D) float32, the memory bank (a chunked greedy coreset, chunked_coreset);
    centroids_ (L, D) float32, the inverted lists of its nearest-neighbour index index_
    (NearestPatchIndex). exact_search (attribute, default False): score by brute force instead.
    """
    name = 'patchcore'
    options = (Option('coreset_ratio', 'coreset_ratio', 0.1, 'fraction',
                      'patchcore: fraction of training patches kept in the memory bank'),)
    fixed_params = {'projection_dims': 128, 'neighbours': 9}
    seeded = True
    localizes = True
    exact_search = False
    bank_rows_ = None  # set by fit, not stored: it serves the hold-out only
    added_bank_rows_ = None  # set by partial_fit, not stored: (bank indices, their rows among the added ones)

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

    def fit(self, features):
        patches = features['patches']
        chosen = chunked_coreset(patches, self.params['coreset_ratio'], projection_dims=self.params['projection_dims'],
                                 seed=self.params['seed'])
        bank = np.ascontiguousarray(patches.reshape(-1, patches.shape[-1])[chosen])
        self.bank_rows_ = chosen // patches.shape[1]  # each bank row's training row, for the hold-out
        return self.set_bank(bank, ivf_centroids(bank, self.params['seed']))

    def fold_models(self, features, fold):
        # One coreset whose chunks never straddle folds (each fold's rows a chain of their own) and one
        # k-means: fold k's model is that bank without fold k's rows, a coreset of the other folds alone.
        # A fit per fold costs five coresets and five k-means per round (metal_nut with --contamination auto:
        # 71 s against 23 s), and left out more good images with the planted ones (docs/accuracy.md).
        patches = features['patches']
        n, p, d = patches.shape
        folds = np.unique(fold)
        chosen = []
        for k in folds:
            rows = np.flatnonzero(fold == k)
            picked = chunked_coreset(patches[rows], self.params['coreset_ratio'],
                                     projection_dims=self.params['projection_dims'], seed=self.params['seed'])
            chosen.append(rows[picked // p] * p + picked % p)
        chosen = np.concatenate(chosen)
        bank, bank_fold = patches.reshape(-1, d)[chosen], fold[chosen // p]
        centroids = ivf_centroids(bank, self.params['seed'])
        for k in folds:
            yield k, type(self)(**self.params).set_bank(np.ascontiguousarray(bank[bank_fold != k]), centroids)

    def partial_fit(self, features, groups):
        """The new images' patches become further chunks of the coreset, the first continuing from the
        bank's last chunk's share (what the fit's next chunk would have started from: chunked_coreset),
        appended to the bank. The index keeps its lists (new rows filed under their nearest centre)
        until the bank has grown so that ivf_centroids would make half as many lists again: then
        k-means runs again on the whole bank."""
        patches = features['patches']
        ratio, n_lists = self.params['coreset_ratio'], len(self.centroids_)
        continued = self.bank_[-coreset_chunk_share(ratio, patches.shape[1]):]
        chosen = chunked_coreset(patches, ratio, projection_dims=self.params['projection_dims'],
                                 seed=self.params['seed'], start=continued)
        self.added_bank_rows_ = len(self.bank_) + np.arange(len(chosen)), chosen // patches.shape[1]
        bank = np.concatenate([self.bank_, patches.reshape(-1, patches.shape[-1])[chosen]])
        # Without lists, ivf_centroids decides itself whether the bank is now large enough for them.
        retrain = not n_lists or ivf_list_count(len(bank)) >= 1.5 * n_lists
        return self.set_bank(bank, ivf_centroids(bank, self.params['seed']) if retrain else self.centroids_)

    def added_holdout_scores(self, features, groups, output_size):
        bank_index, rows = self.added_bank_rows_
        return self._holdout(features['patches'], groups, bank_index, groups[rows], output_size)

    def set_bank(self, bank, centroids):
        self.bank_, self.centroids_ = bank, centroids
        self.index_ = NearestPatchIndex(bank, centroids)
        return self

    def score(self, features, output_size):
        scores, distances = self._nearest(features['patches'])
        grid = self.params['grid']
        return scores, upsample_and_smooth(distances.reshape(-1, grid, grid), output_size)

    def holdout_scores(self, features, groups, output_size):
        return self._holdout(features['patches'], groups, np.arange(len(self.bank_)), groups[self.bank_rows_],
                             output_size)

    def _holdout(self, patches, groups, bank_index, bank_groups, output_size):
        """Each image searched against the bank without its own patches (a new image's are not in it
        either). bank_index: bank rows that come from these images; bank_groups: the image of each."""
        scores, distances = zip(*(self._nearest(patches[row:row + 1], bank_index[bank_groups == group])
                                  for group, row in zip(groups[first_rows(groups)], first_rows(groups))))
        distances = np.concatenate(distances)
        return np.concatenate(scores), _map_maxima(distances, self.params['grid'], output_size)

    def _nearest(self, patches, excluded=None):
        """patches (Q, P, D) -> (image scores (Q,), each patch's distance to the bank (Q, P)); excluded:
        bank rows left out of both the search and the re-weighting."""
        n, p, d = patches.shape
        distances, indices = self.index_.search(patches.reshape(-1, d), exact=self.exact_search, excluded=excluded)
        distances, indices = distances.reshape(n, p), indices.reshape(n, p)
        # Re-weighting (PatchCore eq. 7): the most anomalous patch's score counts less when its
        # nearest bank patch lies in a dense region of the bank, where the distance is less telling.
        worst = distances.argmax(axis=1)
        worst_patch = patches[np.arange(n), worst]
        worst_distance = distances[np.arange(n), worst]
        anchor = self.bank_[indices[np.arange(n), worst]]
        to_bank = squared_distances(anchor, self.bank_)  # order only: no square root needed
        if excluded is not None:
            to_bank[:, excluded] = np.inf
        b = min(self.params['neighbours'], len(self.bank_) - (0 if excluded is None else len(excluded)))
        neighbourhood = self.bank_[np.argpartition(to_bank, b - 1, axis=1)[:, :b]]       # (n, b, d)
        spread = np.linalg.norm(neighbourhood - worst_patch[:, None], axis=2)            # (n, b)
        weight = 1 - 1 / np.exp(spread - worst_distance[:, None]).sum(axis=1)           # stable softmax
        return weight * worst_distance, distances

    def state(self):
        return {'memory_bank': self.bank_, 'bank_centroids': self.centroids_}

    def expected_state(self):
        self._param('neighbours', lambda k: _is_int(k) and k > 0, 'a positive integer')
        self._grid()
        channels = self._channels(self.params.get('levels'))
        return {'memory_bank': (('M', channels), 'float32'), 'bank_centroids': (('L*', channels), 'float32')}

    def feature_state(self):
        return {'patches': ((self._grid() ** 2, self._channels(self.params['levels'])), 'float32')}

    def load_state(self, arrays):
        bank, centroids = arrays['memory_bank'], arrays['bank_centroids']
        if bank.ndim != 2 or not len(bank) or centroids.ndim != 2 or centroids.shape[1] != bank.shape[1]:
            raise FeatureFileError(f'memory bank {bank.shape} and index centres {centroids.shape} do not fit together')
        return self.set_bank(np.ascontiguousarray(bank, np.float32), np.ascontiguousarray(centroids, np.float32))


METHODS = {m.name: m for m in (MahalanobisMethod, PadimMethod, SpadeMethod, PatchCoreMethod)}


def make_method(name, seed=0, **options):
    """An unconfigured method `name` with the user's options, by flag (padim_dims=..., spade_k=...,
    coreset_ratio=...; each method takes its own, the others' are ignored)."""
    known = {o.flag for method in METHODS.values() for o in method.options}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f'unknown method options {", ".join(sorted(unknown))}')
    return METHODS[name](**METHODS[name].default_params(seed, **options))


def method_options():
    """Every method's Options, in METHODS order."""
    return [option for method in METHODS.values() for option in method.options]


def concatenate_features(batches):
    """[{name: (n_i, ...)}, ...] -> {name: (sum n_i, ...)}."""
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def select_features(features, rows):
    return {key: value[rows] for key, value in features.items()}

