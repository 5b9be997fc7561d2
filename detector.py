"""The Detector: fit on good images, score new ones, decide verdicts, save and load.

The one implementation of fitting, scoring and thresholds behind every front end (the CLI,
evaluate.py, the benchmarks, and the video, watcher, web and export front ends):

    detector = Detector(model='lite0', method='padim').fit(train_paths)
    scores = detector.decision_function(test_paths)      # (N,) float, larger = more anomalous
    verdicts = detector.predict(test_paths)              # (N,) int, 1 = anomaly
    for result in detector.inspect(test_paths): ...      # score, verdict, map and view, lazily
    detector.calibrate(test_paths, masks).save('bottle_padim.pkl')

Where things happen: an image becomes a tensor in image_utils, a tensor feature maps in
model_utils.FeatureExtractor, feature maps a score and a map in anomaly_model, a score a verdict
here (the thresholds), and a verdict a figure in plot_utils.
"""
import collections.abc
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import threading
import time

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

import anomaly_model
import export_onnx
import image_utils
import model_utils
import plot_utils
from anomaly_model import FeatureFileError
from image_utils import ImageError

logger = logging.getLogger('mahalanobisad')
__version__ = '0.2.0'  # recorded in exported models

# Settings that change the features themselves: a feature file fitted with others cannot be used.
FEATURE_SETTINGS = ('backbone', 'input_size', 'resize_size', 'mean', 'std', 'feature_names', 'method')
# Settings of the fit: the CLI does not silently reuse a default-named feature file fitted with others.
FIT_SETTINGS = ('train_dir', 'aug', 'aug_num', 'seed', 'method_options', 'contamination')
HOLDOUT_SOURCE = 'training hold-out'
STORED_PREFIX = 'stored: '  # threshold_source_ of thresholds reused from a feature file


class UsageError(ValueError):
    """Arguments that cannot work together; the message says what to change."""


@dataclasses.dataclass
class Inspection:
    """What the detector made of one input, in input order.

    index: position in the input iterable; path: the file given, or None for an array;
    score: image anomaly score (larger = more anomalous); anomaly: score >= threshold;
    view: the network's view of the image, RGB uint8 (S, S, 3), S = the backbone's input size;
    anomaly_map: pixel anomaly scores (S, S) float32, or None for a method without maps;
    gt_mask: ground truth (S, S) bool when a mask was given (None: no mask, i.e. normal);
    error: why the input could not be read (then score, anomaly, view and map are None).
    """
    index: int
    path: str = None
    score: float = None
    anomaly: bool = None
    view: np.ndarray = None
    anomaly_map: np.ndarray = None
    gt_mask: np.ndarray = None
    error: str = None


def pixel_arrays(results):
    """Ground truth and maps of inspected images, stacked: (masks (N, S, S) bool, maps (N, S, S)); an
    image without a mask counts as defect-free."""
    masks = np.stack([r.gt_mask if r.gt_mask is not None else np.zeros(r.view.shape[:2], bool) for r in results])
    return masks, np.stack([r.anomaly_map for r in results])


def check_settings(name, meta, settings, keys, what, hint):
    """FeatureFileError naming every setting in `keys` where `meta` (a feature file's) and
    `settings` (what is asked for now) differ."""
    differences = [f'{k} {meta.get(k)!r} here {settings[k]!r}' for k in keys if meta.get(k) != settings[k]]
    if differences:
        raise FeatureFileError(f'{name} {what}: {"; ".join(differences)}; {hint}')


def labelled_set_fingerprint(images, masks=None, **settings):
    """What thresholds derived from labelled images depend on -> a JSON-able dict.

    images, masks: the labelled image files and their mask files (None entries: normal images);
    settings: how the thresholds are derived from them (e.g. rule='F1-optimal'). The files count by
    absolute path, size and modification time, so adding, removing, replacing or touching one changes
    the fingerprint without reading any image.
    """
    masks = [None] * len(images) if masks is None else masks
    digest = hashlib.sha256()
    for path in list(images) + [m for m in masks if m is not None]:
        path = os.path.abspath(os.fspath(path))
        stat = os.stat(path)
        digest.update(f'{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode())
    return {'files': digest.hexdigest(), 'n_images': len(images), 'n_masks': sum(m is not None for m in masks),
            'settings': json.loads(json.dumps(settings))}


class StageTimer:
    """Seconds spent per stage, added from any thread: `with timer('backbone'): ...`; `seconds` {stage: s}."""

    def __init__(self):
        self.seconds = collections.Counter()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, stage):
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[stage] += time.perf_counter() - start


def _untimed(stage):
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=4)
def _backbone(model, model_dir, model_url, provider=None):
    """(BackboneSpec, FeatureExtractor), opened once per process and shared by every Detector."""
    spec, onnx_path = model_utils.resolve_model(model, model_dir, model_url)
    extractor = model_utils.FeatureExtractor(onnx_path, provider)
    logger.info('model %s (%s, input %dx%d, %d feature levels, on %s)', spec.name, onnx_path,
                spec.input_size, spec.input_size, len(extractor.output_names), extractor.session.get_providers()[0])
    return spec, extractor


def _paired(images, masks):
    """(image, mask) pairs; masks None means no masks. Unequal lengths are a UsageError."""
    if masks is None:
        yield from ((image, None) for image in images)
        return
    try:
        yield from zip(images, masks, strict=True)
    except ValueError:
        raise UsageError('images and masks differ in length') from None


def _open_fraction(value, high, message):
    """value as a float if it is a number (not a bool) in (0, high), else UsageError(message)."""
    try:
        number = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not 0 < number < high:
        raise UsageError(message)
    return number


def check_contamination(contamination):
    """None, 'auto' or a fraction in (0, 0.5) -> itself (a float for a fraction); else UsageError."""
    if contamination is None or contamination == 'auto':
        return contamination
    return _open_fraction(contamination, 0.5,
                          f"contamination must be 'auto' or a fraction in (0, 0.5), got {contamination!r}")


def check_fpr(fpr):
    """A false-positive rate in (0, 1) -> float; else UsageError."""
    return _open_fraction(fpr, 1, f'fpr must be in (0, 1), got {fpr!r}')


def _length(items):
    try:
        return len(items)
    except TypeError:  # a generator: the progress bar counts without a total
        return None


class Detector:
    """An anomaly detector on pretrained features: one backbone, one method, its thresholds.

    Parameters: model ('lite0', 'lite1', 'lite2', 'b0'..'b7' or a path to an .onnx feature
    extractor), method ('mahalanobis', 'padim', 'spade', 'patchcore'), model_dir (cache of ONNX
    backbones), seed (augmentation, channel subsets, coresets, folds), batch_size (images per
    backbone run), model_url (base URL of b0..b7 downloads), padim_dims, spade_k, coreset_ratio
    (method options, as the CLI flags), aug_num (augmented views per training image; 0 = none),
    contamination (None: trust every training image; 'auto' or a fraction in (0, 0.5): leave out the
    training images that look defective, see `fit`), max_pixels (image files larger than this,
    width x height, are refused from their header before decoding: see image_utils). The backbone is
    opened on first use, so constructing a Detector is cheap and offline.

    Fitted attributes: method_ (the fitted anomaly_model.AnomalyMethod), meta_ (what produced it:
    backbone, settings, n_train_images, held-out thresholds and scores, excluded_train_images),
    threshold_ (image score threshold: anomalous if score >= threshold_), pixel_threshold_
    (anomaly-map value from which a pixel counts as defective; None without maps), threshold_source_
    (where the threshold came from), target_fpr_ (the false-positive rate the hold-out threshold
    guarantees, or None for a threshold from elsewhere), calibration_ (F1 figures of the last
    calibrate, or None), calibrated_on_ (labelled_set_fingerprint of the labelled images the
    thresholds were derived for, None if not derived from labelled images; saved with the thresholds,
    see use_stored_thresholds), bit_depth_ (significant bits of 16-bit image files, learnt from the
    training images: 8 when they were all 8-bit; see image_utils.load_view for the policy every later
    image follows), loaded_from_ (the feature file `load` read, or None). provider: onnxruntime
    execution provider of the backbone (None = CPU).

    images, everywhere: an iterable of file paths and/or RGB uint8 arrays (H, W, 3) of any size,
    streamed through a bounded thread pool (memory flat in the number of images, decoding overlapped
    with inference).
    """

    def __init__(self, model=model_utils.DEFAULT_MODEL, method='mahalanobis', model_dir='models', seed=0,
                 batch_size=16, model_url=None, padim_dims=200, spade_k=50, coreset_ratio=0.1, aug_num=0,
                 contamination=None, max_pixels=image_utils.DEFAULT_MAX_PIXELS, provider=None):
        if method not in anomaly_model.METHODS:
            raise UsageError(f'unknown method {method!r}: choose one of {", ".join(anomaly_model.METHODS)}')
        for name, value, lowest in (('seed', seed, 0), ('batch_size', batch_size, 1), ('padim_dims', padim_dims, 1),
                                    ('spade_k', spade_k, 1), ('aug_num', aug_num, 0), ('max_pixels', max_pixels, 1)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lowest:
                raise UsageError(f'{name} must be an integer >= {lowest}, got {value!r}')
        if not 0 < coreset_ratio <= 1:
            raise UsageError(f'coreset_ratio must be in (0, 1], got {coreset_ratio!r}')
        self.model, self.method, self.model_dir, self.model_url = model, method, model_dir, model_url
        self.seed, self.batch_size, self.aug_num = int(seed), int(batch_size), int(aug_num)
        self.padim_dims, self.spade_k, self.coreset_ratio = int(padim_dims), int(spade_k), float(coreset_ratio)
        self.provider = provider
        self.contamination = check_contamination(contamination)
        self.max_pixels = int(max_pixels)
        self.method_ = self.meta_ = self.calibration_ = self.calibrated_on_ = None
        self.bit_depth_ = self.loaded_from_ = None
        self.threshold_ = self.pixel_threshold_ = self.threshold_source_ = self.target_fpr_ = None

    # ------------------------------------------------------------------------------------------
    # backbone and settings
    # ------------------------------------------------------------------------------------------

    @property
    def spec(self):
        """The backbone's model_utils.BackboneSpec (input size, normalisation)."""
        return _backbone(self.model, self.model_dir, self.model_url, self.provider)[0]

    @property
    def extractor(self):
        """The backbone: model_utils.FeatureExtractor, (N, 3, S, S) float32 -> feature maps."""
        return _backbone(self.model, self.model_dir, self.model_url, self.provider)[1]

    @property
    def localizes(self):
        """Whether the fitted method draws anomaly maps."""
        return bool(self.method_ is not None and self.method_.localizes)

    def _new_method(self, name=None):
        """An unconfigured method with this detector's options: `name`, or this detector's method."""
        return anomaly_model.make_method(name or self.method, self.padim_dims, self.spade_k, self.coreset_ratio,
                                         self.seed)

    def settings(self):
        """What a feature file records of how it was produced (FEATURE_SETTINGS, and FIT_SETTINGS
        but train_dir)."""
        spec = self.spec
        return {'backbone': spec.name, 'input_size': spec.input_size, 'resize_size': spec.resize_size,
                'mean': list(spec.mean), 'std': list(spec.std), 'feature_names': self.extractor.output_names,
                'method': self.method, 'method_options': dict(self._new_method().params),
                'aug': self.aug_num > 0, 'aug_num': self.aug_num, 'seed': self.seed,
                'contamination': self.contamination}

    # ------------------------------------------------------------------------------------------
    # image -> network view (the items of `images`)
    # ------------------------------------------------------------------------------------------

    def _view(self, image):
        """A path or an RGB uint8 array -> (network view (S, S, 3) uint8 RGB, original (H, W))."""
        spec = self.spec
        if isinstance(image, np.ndarray):
            image = image_utils.check_rgb_array(image)
            return image_utils.network_view(image, spec.resize_size, spec.input_size), image.shape[:2]
        return image_utils.load_view(os.fspath(image), spec.resize_size, spec.input_size, self.bit_depth_,
                                     self.max_pixels)

    def _views_for_fit(self, index, image):
        """All views of one training image (decoded once): the plain one, then aug_num augmented ones;
        and the image's (H, W)."""
        spec = self.spec
        if not self.aug_num:
            view, shape = self._view(image)
            return [view], shape
        image = (image_utils.check_rgb_array(image) if isinstance(image, np.ndarray)
                 else image_utils.load_image(os.fspath(image), self.bit_depth_, self.max_pixels))
        views = [image_utils.network_view(image, spec.resize_size, spec.input_size)]
        for copy in range(1, 1 + self.aug_num):  # seeded per (image, copy): the same views whatever the thread order
            rng = np.random.default_rng([self.seed, index, copy])
            views.append(image_utils.augment(image, rng, spec.resize_size, spec.input_size))
        return views, image.shape[:2]

    def _mask_view(self, mask, image_shape):
        """A mask path or bool array of the image's size -> (S, S) bool in the network's geometry."""
        spec = self.spec
        try:
            mask = (image_utils.load_mask(os.fspath(mask), image_shape, self.max_pixels)
                    if not isinstance(mask, np.ndarray)
                    else image_utils.check_mask_array(mask, image_shape))
        except ImageError as e:  # broken ground truth would bias the thresholds: stop
            raise UsageError(f'ground truth unusable: {e}') from None
        return image_utils.mask_view(mask, spec.resize_size, spec.input_size)

    def _tensors(self, views):
        spec = self.spec
        return np.stack([image_utils.to_tensor(view, spec.mean, spec.std) for view in views])

    # ------------------------------------------------------------------------------------------
    # fit
    # ------------------------------------------------------------------------------------------

    def fit(self, images, source=None):
        """Fit the method on good images (plus aug_num augmented views of each) -> self.

        Unreadable images are skipped with a warning; at least 2 must be readable. Also computes
        held-out scores of the training images (k-fold) and sets threshold_ / pixel_threshold_ from
        them. With `contamination`, the images whose held-out scores are outliers are left out
        (anomaly_model.holdout_without_outliers: a few rounds of refit and rescore; the scores of
        method.screened_by where it names another method, PaDiM's for mahalanobis), logged and
        recorded in meta_['excluded_train_images']. source: what the images are (the CLI passes the
        training directory), recorded in meta_. The bit depth of 16-bit image files is learnt first
        (bit_depth_), so `images` is read twice when it holds such files (an iterator is turned into a
        list for that).
        """
        spec, extractor, method = self.spec, self.extractor, self._new_method()
        if not isinstance(images, collections.abc.Sequence):
            images = list(images)
        self.bit_depth_ = image_utils.learn_bit_depth([i for i in images if not isinstance(i, np.ndarray)],
                                                      self.max_pixels)
        if self.bit_depth_ > 8:
            logger.info('training images hold %d-bit data in 16-bit files: 0..%d is read as 0..255 for them and '
                        'every later image', self.bit_depth_, (1 << self.bit_depth_) - 1)
        screen = method  # the method whose held-out scores find defective training images
        batches, screen_batches, groups, plain_rows, names, image_sizes = [], [], [], [], {}, set()
        with tqdm(total=_length(images), desc='fit: features', unit='img') as progress, \
                threadpool_limits(1, 'blas'):
            for batch in image_utils.stream(enumerate(images), lambda item: self._views_for_fit(*item),
                                            self.batch_size):
                progress.update(len(batch))
                views, plain = [], []
                for (index, image), loaded in batch:
                    if isinstance(loaded, ImageError):
                        logger.warning('skipping training image: %s', loaded)
                        continue
                    names[index] = (f'array #{index}' if isinstance(image, np.ndarray)
                                    else image_utils.display_path(image))
                    item_views, (height, width) = loaded
                    views += item_views
                    plain += [True] + [False] * (len(item_views) - 1)
                    groups += [index] * len(item_views)
                    image_sizes.add((width, height))
                for start in range(0, len(views), self.batch_size):
                    feature_maps = extractor(self._tensors(views[start:start + self.batch_size]))
                    if not batches:
                        self._configure(method, feature_maps)
                        screen = self._screening_method(method, feature_maps)
                    batches.append(method.features(feature_maps))
                    plain_views = np.array(plain[start:start + self.batch_size])
                    if screen is not method and plain_views.any():  # plain views only: one score per image
                        screen_batches.append(screen.features([m[plain_views] for m in feature_maps]))
                plain_rows += plain
        n_images = len(set(groups))
        if n_images < 2:
            raise UsageError(f'need at least 2 readable training images, found {n_images}')
        train_features, groups = anomaly_model.concatenate_features(batches), np.array(groups)
        kept, excluded, holdout = np.ones(len(groups), bool), [], None
        if self.contamination is not None:
            logger.info('looking for defective training images (contamination %s) by their held-out %s scores',
                        self.contamination, screen.name)
            screen_features, screen_groups = ((train_features, groups) if screen is method else
                                              (anomaly_model.concatenate_features(screen_batches),
                                               groups[np.array(plain_rows)]))
            screen_kept, screen_scores, screen_maxima, excluded = anomaly_model.holdout_without_outliers(
                screen, screen_features, screen_groups, spec.input_size, self.contamination, seed=self.seed)
            kept = np.isin(groups, screen_groups[screen_kept])
            if screen is method:  # its last round scored the hold-out of exactly the fit below
                holdout = screen_scores, screen_maxima
            for group, score, round_ in excluded:
                logger.warning('excluded training image (held-out %s score %.3f, round %d): %s',
                               screen.name, score, round_, names[group])
            logger.info('excluded %d of %d training images', len(excluded), n_images)
        train_features, groups = anomaly_model.select_features(train_features, kept), groups[kept]
        logger.info('fitting %s on %d views of %d images', method.name, len(groups), n_images - len(excluded))
        # Fitted with the hold-out folds, so a method can carve its hold-out models out of this fit.
        method.fit(train_features, folds=anomaly_model.holdout_folds(groups, seed=self.seed))
        image_scores, pixel_maxima = holdout or anomaly_model.holdout_scores(method, train_features, groups,
                                                                             spec.input_size, seed=self.seed)
        self.method_ = method
        self.meta_ = dict(self.settings(), model=self.model, train_dir=source,
                          n_train_images=n_images - len(excluded), bit_depth=self.bit_depth_,
                          holdout_thresholds={'image': float(image_scores.max()),
                                              'pixel': None if pixel_maxima is None else float(pixel_maxima.max())},
                          holdout_scores=[float(s) for s in image_scores],
                          holdout_pixel_maxima=None if pixel_maxima is None else [float(s) for s in pixel_maxima],
                          excluded_train_images=[names[group] for group, _, _ in excluded],
                          train_image_size=list(image_sizes.pop()) if len(image_sizes) == 1 else None)
        self.calibration_ = None
        self.use_holdout_thresholds(log=False)
        return self

    def _screening_method(self, method, feature_maps):
        """The method (configured) whose held-out scores find defective training images under
        `contamination`: method.screened_by with this detector's options, or `method` itself (also
        where that one cannot use this backbone's outputs)."""
        if self.contamination is None or method.screened_by is None:
            return method
        screen = self._new_method(method.screened_by)
        try:
            screen.configure([m.shape[1:] for m in feature_maps], self.spec.input_size)
        except anomaly_model.MethodError:
            return method
        return screen

    def _configure(self, method, feature_maps):
        """Fit `method` to this backbone's outputs; warn once if it cannot draw maps."""
        method.configure([m.shape[1:] for m in feature_maps], self.spec.input_size)
        if not method.localizes:
            sizes = ', '.join(f'{m.shape[-1]}x{m.shape[-2]}' for m in feature_maps)
            logger.warning('%s has no feature maps of stride 4..16 (its outputs are %s): image-level scores only, '
                           'no heat maps', self.spec.name, sizes)

    def _check_fitted(self):
        if self.method_ is None:
            raise UsageError('this Detector is not fitted: call fit(images) or Detector.load(path) first')

    # ------------------------------------------------------------------------------------------
    # score
    # ------------------------------------------------------------------------------------------

    def inspect(self, images, masks=None, desc='score', timer=None):
        """Yield an Inspection per input, lazily and in input order (see Inspection for the fields).

        masks: optional iterable aligned with `images`, each None (a normal image), a mask file
        (any non-zero pixel is defect) or a bool array of the image's (H, W); attached as gt_mask.
        An unreadable image gives an Inspection with `error` set (and a logged warning), so indices
        stay aligned. desc: progress bar label, None for no bar. timer: a StageTimer that gets the
        seconds of 'decode' (summed over the decoding threads), 'backbone' and 'scoring'.
        """
        self._check_fitted()
        spec, extractor, method = self.spec, self.extractor, self.method_
        entries = enumerate(_paired(images, masks))
        timer = timer or _untimed

        def load(entry):
            _, (image, mask) = entry
            with timer('decode'):
                view, image_shape = self._view(image)
                return view, None if mask is None else self._mask_view(mask, image_shape)

        # Scoring arithmetic stays on this thread: BLAS helper threads would compete with the decoders.
        with tqdm(total=_length(images), desc=desc, unit='img', leave=False, disable=desc is None) as progress, \
                threadpool_limits(1, 'blas'):
            for batch in image_utils.stream(entries, load, self.batch_size):
                progress.update(len(batch))
                good = [(index, loaded) for (index, _), loaded in batch if not isinstance(loaded, ImageError)]
                scored = {}
                if good:
                    views = [view for _, (view, _) in good]
                    with timer('backbone'):
                        feature_maps = extractor(self._tensors(views))
                    self._check_feature_shapes(feature_maps)
                    with timer('scoring'):
                        scores, maps = method.score(method.features(feature_maps), spec.input_size)
                    scored = {index: (float(score), view, None if maps is None else maps[i], gt_mask)
                              for i, ((index, (view, gt_mask)), score) in enumerate(zip(good, scores))}
                for (index, (image, _)), loaded in batch:
                    path = None if isinstance(image, np.ndarray) else os.fspath(image)
                    if isinstance(loaded, ImageError):
                        logger.warning('skipping: %s', loaded)
                        yield Inspection(index, path, error=str(loaded))
                        continue
                    score, view, anomaly_map, gt_mask = scored[index]
                    yield Inspection(index, path, score, bool(score >= self.threshold_), view, anomaly_map, gt_mask)

    def _check_feature_shapes(self, feature_maps):
        """FeatureFileError unless the backbone's maps have the shapes the fitted state was built on
        (a feature file can name this backbone and still hold another's shapes)."""
        shapes = [list(m.shape[1:]) for m in feature_maps]
        fitted = self.method_.params.get('feature_shapes')
        if shapes != fitted:
            raise FeatureFileError(f'{self.loaded_from_}: damaged feature file: fitted on feature maps of shapes '
                                   f'{fitted}, this backbone gives {shapes}')

    def decision_function(self, images):
        """Image anomaly scores -> (N,) float64, larger = more anomalous (PyOD's convention).
        Raises ImageError on the first unreadable image (inspect() reports them per item)."""
        scores = []
        for result in self.inspect(images):
            if result.error:
                raise ImageError(result.error)
            scores.append(result.score)
        return np.array(scores, np.float64)

    def predict(self, images):
        """Verdicts -> (N,) int: 1 = anomaly (score >= threshold_), 0 = normal."""
        self._check_fitted()
        return (self.decision_function(images) >= self.threshold_).astype(int)

    # ------------------------------------------------------------------------------------------
    # thresholds
    # ------------------------------------------------------------------------------------------

    def set_threshold(self, threshold, source, pixel_threshold=None):
        """Set the image threshold (and, if given, the pixel threshold) by hand; source: why, for logs and files.

        calibrated_on_ is kept: a threshold chosen by hand for a calibrated labelled set (say in the web
        console), once saved, is reused by later runs with that set until it changes or is recalibrated.
        """
        self._check_fitted()
        threshold = float(threshold)
        if not np.isfinite(threshold):
            raise UsageError(f'threshold must be a finite number, got {threshold}')
        self.threshold_, self.threshold_source_, self.target_fpr_ = threshold, source, None
        if pixel_threshold is not None:
            self.pixel_threshold_ = float(pixel_threshold)
        logger.info('image threshold %.3f from %s', threshold, source)
        return self

    def use_holdout_thresholds(self, image=True, pixel=True, log=True, fpr=None):
        """Thresholds from the held-out scores of the n training images, for a false-positive rate.

        fpr: a new normal image is flagged (image threshold), or shows any pixel at or above the pixel
        threshold, with probability at most fpr (anomaly_model.conformal_threshold on the held-out
        image scores, and on each held-out image's largest pixel score). None: the largest held-out
        scores, which is the same rule for fpr = 1/(n + 1). With n < 1/fpr - 1 no threshold can
        guarantee fpr: a warning, and the largest scores.
        """
        self._check_fitted()
        scores = self.meta_['holdout_scores']
        n = len(scores)
        target = 1 / (n + 1) if fpr is None else check_fpr(fpr)
        if image:
            self.threshold_, certified = anomaly_model.conformal_threshold(scores, target)
            self.threshold_source_, self.target_fpr_ = HOLDOUT_SOURCE, target
            if not certified:
                self.target_fpr_ = 1 / (n + 1)
                logger.warning('%d held-out training images cannot guarantee FPR %g (that needs at least %d): '
                               'using the largest score', n, target, int(np.ceil(1 / target - 1)))
            elif fpr is not None:
                self.threshold_source_ = f'{HOLDOUT_SOURCE}, FPR {target:g}'
            self.calibrated_on_ = None
            if log:
                logger.info('image threshold %.3f from %d held-out training images: a new normal image is flagged '
                            'with probability at most %.4f', self.threshold_, n, self.target_fpr_)
        if pixel:
            maxima = self.meta_.get('holdout_pixel_maxima')
            if not self.localizes:
                self.pixel_threshold_ = None
            elif maxima is None:  # a feature file from before per-image maxima were kept
                self.pixel_threshold_ = self.meta_['holdout_thresholds']['pixel']
            else:
                self.pixel_threshold_ = anomaly_model.conformal_threshold(maxima, target)[0]
            if log and self.localizes:
                logger.info('pixel threshold %.3f: a held-out normal image has any pixel above it with '
                            'probability at most %.4f', self.pixel_threshold_, max(target, 1 / (n + 1)))
        return self

    def calibrate(self, images, masks, source=None, fingerprint=None):
        """F1-optimal image and pixel thresholds from labelled images -> self.

        masks: aligned with `images`, None for a normal image, else its mask (path or bool (H, W)
        array; an all-zero mask is a normal image). Needs normal and anomalous images; without both,
        a warning and the training hold-out thresholds (never a threshold from one class).
        fingerprint: labelled_set_fingerprint of the images, kept as calibrated_on_ (saved with the
        thresholds, so that later runs on the same set reuse them: use_stored_thresholds).
        """
        n = _length(images)
        results = [r for r in self.inspect(images, masks, desc='threshold: labelled images') if not r.error]
        return self.calibrate_results(results, source or f'{n if n is not None else len(results)} labelled images',
                                      fingerprint)

    def calibrate_results(self, results, source='labelled images', fingerprint=None):
        """`calibrate` on already inspected images (Inspection with gt_mask) -> self."""
        self._check_fitted()
        results = [r for r in results if r.error is None]
        labels = np.array([r.gt_mask is not None and bool(r.gt_mask.any()) for r in results], bool)
        self.calibration_ = None
        if not labels.any() or labels.all():
            logger.warning('%s has %s: cannot derive an F1-optimal threshold', source,
                           'no defect masks' if not labels.any() else 'no normal images')
            self.use_holdout_thresholds()
            self.calibrated_on_ = fingerprint  # what this set gives, so it is not scored again for the same answer
            return self
        threshold, f1 = anomaly_model.f1_optimal_threshold(labels, [r.score for r in results])
        self.threshold_, self.threshold_source_, self.target_fpr_ = threshold, f'F1-optimal on {source}', None
        self.calibration_ = {'image_f1': f1, 'n_images': len(results), 'n_anomalous': int(labels.sum())}
        logger.info('image threshold %.3f maximises F1 (%.3f) on %d labelled images (%d anomalous)',
                    threshold, f1, len(results), labels.sum())
        if self.localizes:
            self.pixel_threshold_, pixel_f1 = anomaly_model.f1_optimal_threshold(*pixel_arrays(results))
            self.calibration_['pixel_f1'] = pixel_f1
            logger.info('pixel threshold %.3f maximises pixel F1 (%.3f)', self.pixel_threshold_, pixel_f1)
        else:
            self.use_holdout_thresholds(image=False)
        self.calibrated_on_ = fingerprint
        return self

    def recalibration_reason(self, fingerprint):
        """Why the current thresholds do not hold for the labelled set `fingerprint`
        (labelled_set_fingerprint) -> str, or None if they do. fingerprint None (no labelled set to
        check against): they hold, whatever they were derived from."""
        stored = self.calibrated_on_
        if fingerprint is None or stored == fingerprint:
            return None
        if stored is None:
            return f'the thresholds ({self.threshold_source_}) were not derived from labelled images'
        if stored['settings'] != fingerprint['settings']:
            return f'threshold settings changed ({stored["settings"]} -> {fingerprint["settings"]})'
        return (f'the labelled set changed ({stored["n_images"]} images + {stored["n_masks"]} masks -> '
                f'{fingerprint["n_images"]} + {fingerprint["n_masks"]}, or files added, replaced or touched)')

    def use_stored_thresholds(self, fingerprint):
        """Keep the thresholds (as loaded from a feature file) if they were derived for the labelled
        set `fingerprint` -> True; else log why not and return False (the caller recalibrates).

        A feature file's thresholds are its latest decision for that set: F1-optimal from calibrate, or
        chosen by hand (set_threshold, e.g. the web console) after it; threshold_source_ becomes
        'stored: <how they were derived>'.
        """
        self._check_fitted()
        reason = self.recalibration_reason(fingerprint)
        if reason:
            logger.info('deriving the thresholds from the labelled images: %s', reason)
            return False
        if not self.threshold_source_.startswith(STORED_PREFIX):
            self.threshold_source_ = STORED_PREFIX + self.threshold_source_
        logger.info('image threshold %.3f %s%s', self.threshold_, self.threshold_source_,
                    ' (no labelled images to check it against)' if fingerprint is None
                    else ', for this labelled set: labelled images not scored')
        return True

    # ------------------------------------------------------------------------------------------
    # export
    # ------------------------------------------------------------------------------------------

    def export(self, path, size=None):
        """Write this detector as one ONNX model (export_onnx): uint8 RGB images (N, H, W, 3) in;
        score, anomaly map and verdict out, as this detector gives them -> self.

        size: (width, height) of the images the model takes (fixed); default the size shared by the
        training images (a UsageError when they differ or the feature file does not record it).
        """
        self._check_fitted()
        if size is None:
            size = self.meta_.get('train_image_size')
            if size is None:
                reason = ('the training images differ in size' if 'train_image_size' in self.meta_
                          else 'the feature file does not record the training images\' size')
                raise UsageError(f'{reason}: give the size of the images to score (--export_size W H)')
        width, height = size
        if min(width, height) < 1:
            raise UsageError(f'export size must be positive, got {width} x {height}')
        size_bytes = export_onnx.export_detector(self, path, (int(width), int(height)), __version__)
        logger.info('exported %s to %s (%.1f MB; input %d x %d RGB, threshold %.3f from %s)', self.method, path,
                    size_bytes / 2 ** 20, width, height, self.threshold_, self.threshold_source_)
        return self

    # ------------------------------------------------------------------------------------------
    # figures, saving and loading
    # ------------------------------------------------------------------------------------------

    def render_figure(self, result, title=''):
        """The four-panel figure of an Inspection with this detector's thresholds -> BGR uint8 image."""
        return plot_utils.render_figure(result.view, result.gt_mask, result.anomaly_map, result.score,
                                        self.threshold_, self.pixel_threshold_, title=title)

    def save(self, path):
        """Write the fitted state, its settings and the current thresholds to the feature file `path`
        (an .npz archive, written atomically; loading it cannot execute code)."""
        self._check_fitted()
        meta = dict(self.meta_, thresholds={'image': self.threshold_, 'pixel': self.pixel_threshold_,
                                            'source': self.threshold_source_.removeprefix(STORED_PREFIX),
                                            'target_fpr': self.target_fpr_, 'labelled': self.calibrated_on_})
        anomaly_model.save_feature_file(path, meta, self.method_)
        return self

    @classmethod
    def load(cls, path, model=None, method=None, model_dir='models', model_url=None, batch_size=16,
             max_pixels=image_utils.DEFAULT_MAX_PIXELS, provider=None):
        """A fitted Detector from a feature file, with the thresholds stored in it (and calibrated_on_,
        the labelled set they were derived for).

        model: the backbone to run (default: the one the file names); model / method given here must
        match what the file was fitted with (FeatureFileError saying what differs, otherwise).
        """
        meta, fitted = anomaly_model.load_feature_file(path)
        _check_meta(path, meta)
        if model is None:
            model = meta.get('model') or next((key for key, spec in model_utils.MODEL_CATALOGUE.items()
                                               if spec.name == meta.get('backbone')), None)
            if model is None:
                raise FeatureFileError(f'{path} was fitted on {meta.get("backbone")!r}: pass the model it used')
        options = meta.get('method_options', {})
        detector = cls(model, method or meta['method'], model_dir, meta.get('seed', 0), batch_size, model_url,
                       padim_dims=options.get('dims', 200), spade_k=options.get('k', 50),
                       coreset_ratio=options.get('coreset_ratio', 0.1), aug_num=meta.get('aug_num', 0),
                       contamination=meta.get('contamination'), max_pixels=max_pixels, provider=provider)
        check_settings(path, meta, detector.settings(), FEATURE_SETTINGS,
                       'cannot be used with this backbone and method', 'pass --feat with a new file name to fit one')
        detector.method_, detector.meta_, detector.bit_depth_ = fitted, meta, meta['bit_depth']
        detector.loaded_from_ = path
        stored = meta.get('thresholds')
        if stored and stored.get('image') is not None:
            detector.threshold_, detector.threshold_source_ = stored['image'], stored['source']
            detector.target_fpr_ = stored.get('target_fpr')
            detector.pixel_threshold_ = stored['pixel'] if detector.localizes else None
            detector.calibrated_on_ = stored.get('labelled')
        else:
            detector.use_holdout_thresholds(log=False)
        return detector


def _finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _check_meta(path, meta):
    """FeatureFileError "<path>: damaged feature file: <what>" unless the Detector's own entries of a
    feature file's metadata are what `fit` and `save` write (anomaly_model checked the arrays)."""
    def damaged(what):
        raise FeatureFileError(f'{path}: damaged feature file: {what}')
    if meta.get('bit_depth') not in (8,) + image_utils.HIGH_BIT_DEPTHS:
        damaged(f'bit_depth {meta.get("bit_depth")!r} is not one of 8, {", ".join(map(str, image_utils.HIGH_BIT_DEPTHS))}')
    if not isinstance(meta.get('n_train_images'), int) or meta['n_train_images'] < 2:
        damaged(f'n_train_images {meta.get("n_train_images")!r} is not a count of at least 2')
    holdout = meta.get('holdout_thresholds')
    if not (isinstance(holdout, dict) and _finite_number(holdout.get('image'))
            and (holdout.get('pixel') is None or _finite_number(holdout['pixel']))):
        damaged(f'holdout_thresholds {str(holdout)[:100]} are not finite numbers')
    stored = meta.get('thresholds')
    if stored is not None and not (isinstance(stored, dict) and isinstance(stored.get('source'), str)
                                   and (stored.get('image') is None or _finite_number(stored['image']))
                                   and (stored.get('pixel') is None or _finite_number(stored['pixel']))):
        damaged(f'thresholds {str(stored)[:100]} are not finite numbers with a source')
    scores = meta.get('holdout_scores', [])
    if not (isinstance(scores, list) and all(_finite_number(s) for s in scores)):
        damaged('holdout_scores are not a list of finite numbers')
    if not isinstance(meta.get('method_options', {}), dict):
        damaged('method_options is not an object')
    maxima = meta.get('holdout_pixel_maxima')
    if maxima is not None and not (isinstance(maxima, list) and all(_finite_number(s) for s in maxima)):
        damaged('holdout_pixel_maxima are not a list of finite numbers')
    excluded = meta.get('excluded_train_images', [])
    if not (isinstance(excluded, list) and all(isinstance(name, str) for name in excluded)):
        damaged('excluded_train_images is not a list of names')
    try:
        check_contamination(meta.get('contamination'))
    except UsageError as e:
        damaged(str(e))
    if stored is not None and stored.get('target_fpr') is not None and not _finite_number(stored['target_fpr']):
        damaged('thresholds.target_fpr is not a finite number')
    labelled = None if stored is None else stored.get('labelled')
    if labelled is not None and not (isinstance(labelled, dict) and isinstance(labelled.get('files'), str)
                                     and all(isinstance(labelled.get(k), int) for k in ('n_images', 'n_masks'))
                                     and isinstance(labelled.get('settings'), dict)):
        damaged('thresholds.labelled is not a labelled-set fingerprint')
