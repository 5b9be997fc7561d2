"""The Detector: fit on good images, score new ones, decide verdicts, save and load.

The one implementation of fitting and scoring behind every front end (the CLI, evaluate.py, the
benchmarks, and the video, watcher, web, archive and export front ends):

    detector = Detector(model='lite0', method='padim').fit(train_paths)
    scores = detector.decision_function(test_paths)      # (N,) float, larger = more anomalous
    verdicts = detector.predict(test_paths)              # (N,) int, 1 = anomaly
    for result in detector.inspect(test_paths): ...      # score, verdict, map and view, lazily
    detector.calibrate(test_paths, masks).save('bottle_padim.pkl')

One image's way through it: an image becomes a tensor in image_utils.Preprocessing, a tensor feature
maps in model_utils.FeatureExtractor, feature maps a score and a map in anomaly_model, a score a
verdict against thresholds.Thresholds, and a verdict a figure in plot_utils. Held-out scores come from
holdout, the file from feature_file, the one-file ONNX model from export_onnx.
"""
import collections.abc
import contextlib
import dataclasses
import logging
import os
import threading
import time

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

import anomaly_model
import export_onnx
import feature_file
import history
import holdout
import image_utils
import model_utils
import plot_utils
import thresholds
from errors import FeatureFileError, ImageError, MethodError, UsageError

logger = logging.getLogger('mahalanobisad')
__version__ = '0.2.0'  # recorded in exported models


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


def _paired(images, masks):
    """(image, mask) pairs; masks None means no masks. Unequal lengths are a UsageError."""
    if masks is None:
        yield from ((image, None) for image in images)
        return
    try:
        yield from zip(images, masks, strict=True)
    except ValueError:
        raise UsageError('images and masks differ in length') from None


def _length(items):
    try:
        return len(items)
    except TypeError:  # a generator: the progress bar counts without a total
        return None


@dataclasses.dataclass
class _TrainingFeatures:
    """What the fit reads from its images. features: the method's {name: (N, ...)} over the N views;
    groups (N,): each view's image index; plain (N,) bool: the unaugmented view; names {index: shown
    name}; image_sizes {(W, H)}; screen: the method whose held-out scores find defective images, and
    screen_features its features of the plain views (None where screen is the method itself)."""
    features: dict
    groups: np.ndarray
    plain: np.ndarray
    names: dict
    image_sizes: set
    screen: anomaly_model.AnomalyMethod
    screen_features: dict = None


class Detector:
    """An anomaly detector on pretrained features: one backbone, one method, its thresholds.

    Parameters: model ('lite0', 'lite1', 'lite2', 'b0'..'b7' or a path to an .onnx feature
    extractor), method ('mahalanobis', 'padim', 'spade', 'patchcore'), model_dir (cache of ONNX
    backbones), seed (augmentation, channel subsets, coresets, folds), batch_size (images per
    backbone run), model_url (base URL of b0..b7 downloads), aug_num (augmented views per training
    image; 0 = none), contamination (None: trust every training image; 'auto' or a fraction in
    (0, 0.5): leave out the training images that look defective, see `fit`), max_pixels (image files
    larger than this, width x height, are refused from their header before decoding: see
    image_utils), provider (onnxruntime execution provider of the backbone; None = CPU), and the
    methods' options by their flags (padim_dims, spade_k, coreset_ratio: anomaly_model.Option; a
    method uses its own, the defaults are the methods'). The backbone is opened on first use, so
    constructing a Detector is cheap and offline.

    Fitted attributes: method_ (the fitted anomaly_model.AnomalyMethod), meta_ (what produced it:
    backbone, settings, n_train_images, held-out scores, excluded_train_images), thresholds_ (the
    thresholds.Thresholds deciding verdicts; threshold_, pixel_threshold_, threshold_source_ and
    target_fpr_ read them), bit_depth_ (significant bits of 16-bit image files, learnt from the
    training images: 8 when they were all 8-bit; see image_utils.load_view), loaded_from_ (the feature
    file `load` read, or None).

    images, everywhere: an iterable of file paths and/or RGB uint8 arrays (H, W, 3) of any size,
    streamed through a bounded thread pool (memory flat in the number of images, decoding overlapped
    with inference).
    """

    def __init__(self, model=model_utils.DEFAULT_MODEL, method='mahalanobis', model_dir='models', seed=0,
                 batch_size=16, model_url=None, aug_num=0, contamination=None,
                 max_pixels=image_utils.DEFAULT_MAX_PIXELS, provider=None, **method_options):
        if method not in anomaly_model.METHODS:
            raise UsageError(f'unknown method {method!r}: choose one of {", ".join(anomaly_model.METHODS)}')
        for name, value, lowest in (('seed', seed, 0), ('batch_size', batch_size, 1), ('aug_num', aug_num, 0),
                                    ('max_pixels', max_pixels, 1)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lowest:
                raise UsageError(f'{name} must be an integer >= {lowest}, got {value!r}')
        options = {o.flag: o for o in anomaly_model.method_options()}
        unknown = sorted(set(method_options) - set(options))
        if unknown:
            raise UsageError(f'unknown option {", ".join(unknown)}: the methods take {", ".join(options)}')
        try:
            self.method_options = {flag: options[flag].check(value) for flag, value in method_options.items()}
        except ValueError as e:
            raise UsageError(str(e)) from None
        self.model, self.method, self.model_dir, self.model_url = model, method, model_dir, model_url
        self.seed, self.batch_size, self.aug_num = int(seed), int(batch_size), int(aug_num)
        self.provider = provider
        self.contamination = holdout.check_contamination(contamination)
        self.max_pixels = int(max_pixels)
        self.method_ = self.meta_ = self.thresholds_ = self.bit_depth_ = self.loaded_from_ = None
        self._size_warned = False

    # ------------------------------------------------------------------------------------------
    # backbone, preprocessing and settings
    # ------------------------------------------------------------------------------------------

    @property
    def spec(self):
        """The backbone's model_utils.BackboneSpec (input size, normalisation)."""
        return model_utils.open_backbone(self.model, self.model_dir, self.model_url, self.provider)[0]

    @property
    def extractor(self):
        """The backbone: model_utils.FeatureExtractor, (N, 3, S, S) float32 -> feature maps."""
        return model_utils.open_backbone(self.model, self.model_dir, self.model_url, self.provider)[1]

    @property
    def preprocessing(self):
        """How an image becomes this detector's network input (image_utils.Preprocessing)."""
        spec = self.spec
        return image_utils.Preprocessing(spec.input_size, spec.resize_size, spec.mean, spec.std, self.bit_depth_,
                                         self.max_pixels)

    @property
    def localizes(self):
        """Whether the fitted method draws anomaly maps."""
        return bool(self.method_ is not None and self.method_.localizes)

    @property
    def holdout_(self):
        """The held-out scores of the training images (holdout.HoldoutScores), from meta_."""
        return holdout.HoldoutScores.from_meta(self.meta_)

    def _new_method(self, name=None):
        """An unconfigured method with this detector's options: `name`, or this detector's method."""
        return anomaly_model.make_method(name or self.method, self.seed, **self.method_options)

    def settings(self):
        """What a feature file records of how it was produced (feature_file.FEATURE_SETTINGS, and
        FIT_SETTINGS but train_dir)."""
        spec = self.spec
        return {'backbone': spec.name, 'input_size': spec.input_size, 'resize_size': spec.resize_size,
                'mean': list(spec.mean), 'std': list(spec.std), 'feature_names': self.extractor.output_names,
                'method': self.method, 'method_options': dict(self._new_method().params),
                'aug': self.aug_num > 0, 'aug_num': self.aug_num, 'seed': self.seed,
                'contamination': self.contamination}

    # ------------------------------------------------------------------------------------------
    # fit
    # ------------------------------------------------------------------------------------------

    def fit(self, images, source=None, by=None):
        """Fit the method on good images (plus aug_num augmented views of each) -> self.

        Unreadable images are skipped with a warning; at least 2 must be readable. Also computes
        held-out scores of the training images (each under the method fitted without it:
        holdout.holdout_scores) and sets the thresholds from them. With `contamination`, the images whose held-out scores are outliers are
        left out (holdout.holdout_without_outliers: a few rounds of refit and rescore; the scores of
        method.screened_by where it names another method, PaDiM's for mahalanobis), logged and
        recorded in meta_['excluded_train_images']. source: what the images are (the CLI passes the
        training directory), recorded in meta_. The bit depth of 16-bit image files is learnt first
        (bit_depth_), so `images` is read twice when it holds such files (an iterator is turned into a
        list for that). The fit is the first entry of meta_['history'] (history.py), with the sha256 of
        every image fitted on; by: who fitted (default the OS user).
        """
        if not isinstance(images, collections.abc.Sequence):
            images = list(images)
        self.bit_depth_ = image_utils.learn_bit_depth([i for i in images if not isinstance(i, np.ndarray)],
                                                      self.max_pixels)
        if self.bit_depth_ > 8:
            logger.info('training images hold %d-bit data in 16-bit files: 0..%d is read as 0..255 for them and '
                        'every later image', self.bit_depth_, (1 << self.bit_depth_) - 1)
        method = self._new_method()
        training = self._training_features(images, method)
        n_images = len(training.names)
        if n_images < 2:
            raise UsageError(f'need at least 2 readable training images, found {n_images}')
        kept, excluded = self._leave_out_defective(training, method)
        features, groups = anomaly_model.select_features(training.features, kept), training.groups[kept]
        logger.info('fitting %s on %d views of %d images', method.name, len(groups), n_images - len(excluded))
        method.fit(features)
        held_out = holdout.HoldoutScores(*holdout.holdout_scores(method, features, groups, self.spec.input_size))
        self.method_ = method
        self.meta_ = dict(self.settings(), model=self.model, train_dir=source, n_train_images=n_images - len(excluded),
                          bit_depth=self.bit_depth_, **held_out.to_meta(),
                          excluded_train_images=[training.names[group] for group, _, _ in excluded],
                          train_image_size=(list(training.image_sizes.pop()) if len(training.image_sizes) == 1
                                            else None))
        self.thresholds_ = thresholds.from_holdout(held_out, localizes=self.localizes, log=False)
        excluded_groups = {group for group, _, _ in excluded}
        fitted = [(training.names[i], history.image_sha256(images[i])) for i in sorted(training.names)
                  if i not in excluded_groups]
        self.meta_['history'] = [history.new_entry([], 'fit', by, fitted, None, self.thresholds_.to_meta(),
                                                   self.meta_['n_train_images'])]
        return self

    def partial_fit(self, images, by=None):
        """Teach the fitted detector more good images, without refitting -> self.

        Costs time proportional to the new images (AnomalyMethod.partial_fit: exact for the Gaussians,
        which keep their moments; SPADE appends; PatchCore extends its coreset). The new images' held-out
        scores (each under the updated model without it) join the training images' (those are kept as
        they were: each under the model it was held out of then), and the thresholds follow by their
        rule (`_thresholds_after_change`). An image already taught (same sha256) is skipped with a note,
        an unreadable one with a warning; neither is recorded as taught. The change is an entry of
        meta_['history'] (history.py), by `by` (default the OS user); nothing at all to add changes
        nothing (no entry). images: as for fit; augmented views as the fit made them (aug_num).
        """
        entries = self.meta_.setdefault('history', []) if self.meta_ else []
        return self._teach('add_good', images, by, self._learn_good_images, {
            'already taught': history.taught_digests(entries),
            'taught as a defect': history.taught_digests(entries, ('add_defects',))})

    def add_defects(self, images, by=None):
        """Teach the detector labelled defects (missed by it, found by an operator) -> self.

        Their features (the method's, of each image's plain view) are kept with the fitted state
        (method_.labelled_, stored in the feature file), so the thresholds are derived again from all the
        labelled defects so far after every change, without the images or the backbone
        (`_thresholds_after_change`: F1-optimal between them and the held-out good images, or a stated FPR
        kept with its recall measured). Already taught images (same sha256, as defect or as good) are
        skipped with a note, unreadable ones with a warning; the change is a history entry.
        """
        entries = self.meta_.setdefault('history', []) if self.meta_ else []
        return self._teach('add_defects', images, by, self._learn_defects, {
            'already taught as a defect': history.taught_digests(entries, ('add_defects',)),
            'taught as a good image': history.taught_digests(entries)})

    def _teach(self, kind, images, by, learn, known):
        """The new images among `images` (`_new_images`, known: {why skipped: sha256 set}) read, then
        `learn(training features, number of images)`, the thresholds derived again and the change recorded
        as a history entry of `kind` -> self (unchanged where nothing is new)."""
        self._check_fitted()
        fresh, digests, skipped = self._new_images(images, known)
        training = self._training_features(fresh, self.method_, configure=False)
        added = sorted(training.names)
        if not added:
            logger.info('no new image to teach: nothing changed')
            return self
        before = self.thresholds_.to_meta()
        learn(training, len(added))
        self.thresholds_ = self._thresholds_after_change()
        entries = self.meta_['history']
        entries.append(history.new_entry(entries, kind, by, [(training.names[i], digests[i]) for i in added], before,
                                         self.thresholds_.to_meta(), self.meta_['n_train_images'], skipped=skipped))
        return self

    def _learn_good_images(self, training, count):
        logger.info('teaching %s %d new good images (%d views)', self.method, count, len(training.groups))
        self.method_.partial_fit(training.features)
        scores, maxima = self.method_.added_holdout_scores(training.features, training.groups, self.spec.input_size)
        old = self.holdout_
        held_out = holdout.HoldoutScores(
            np.concatenate([old.image, scores]),
            None if maxima is None or old.pixel_maxima is None else np.concatenate([old.pixel_maxima, maxima]))
        self.meta_.update(held_out.to_meta(), n_train_images=self.meta_['n_train_images'] + count)

    def _learn_defects(self, training, count):
        logger.info('keeping the features of %d labelled defects', count)
        plain = anomaly_model.select_features(training.features, training.plain)
        known = self.method_.labelled_features()
        self.method_.labelled_ = {name: np.concatenate([known[name], plain[name]]) for name in known}

    def _new_images(self, images, known):
        """The images not yet taught -> (images, their sha256, skipped [{name, why}]). known: {why: set of
        sha256}; an unreadable file is left out with a warning (and not recorded)."""
        fresh, digests, skipped, seen = [], [], [], set()
        for index, image in enumerate(images):
            name = history.image_name(image, index)
            try:
                digest = history.image_sha256(image)
            except OSError as e:
                logger.warning('skipping unreadable image %s: %s', name, e.strerror or e)
                continue
            why = next((why for why, digests_ in known.items() if digest in digests_),
                       'given twice' if digest in seen else None)
            if why:
                logger.info('skipped (%s): %s (sha256 %s)', why, name, digest[:16])
                skipped.append({'name': name, 'why': why})
                continue
            seen.add(digest)
            fresh.append(image)
            digests.append(digest)
        return fresh, digests, skipped

    def _thresholds_after_change(self):
        """The thresholds by the current ones' rule, after the model, its held-out scores or the labelled
        defects changed: with labelled defects, thresholds.from_holdout_and_defects (a stated FPR kept,
        else F1-optimal); otherwise a hold-out rule again at its false-positive rate; an F1 or a manual
        threshold from labelled images cannot be re-derived without them: the hold-out, with a warning."""
        current = self.thresholds_
        fpr = (current.target_fpr if current.rule == thresholds.HOLDOUT and current.source != thresholds.HOLDOUT_SOURCE
               else None)
        defects = self.method_.labelled_features()
        if len(next(iter(defects.values()))):
            scores = self.method_.score(defects, self.spec.input_size)[0]
            return thresholds.from_holdout_and_defects(self.holdout_, scores, fpr, self.localizes)
        if current.rule == thresholds.HOLDOUT:
            return thresholds.from_holdout(self.holdout_, fpr, self.localizes, log=True)
        logger.warning('the %s thresholds (%s) were chosen for the model before this change: using the training '
                       'hold-out until they are derived again', current.rule, current.source)
        return thresholds.from_holdout(self.holdout_, localizes=self.localizes, log=True)

    def _training_features(self, images, method, configure=True):
        """Stream the training images through the backbone -> _TrainingFeatures; configures `method`
        (and the screening method) on the first batch's feature maps, unless configure is False (a
        fitted method: the maps' shapes are checked against it)."""
        preprocessing, extractor = self.preprocessing, self.extractor
        batches, screen_batches, groups, plain_rows, names, image_sizes = [], [], [], [], {}, set()
        screen = method
        with tqdm(total=_length(images), desc='fit: features', unit='img') as progress, \
                threadpool_limits(1, 'blas'):
            load = lambda item: preprocessing.training_views(item[1], item[0], self.aug_num, self.seed)  # noqa: E731
            for batch in image_utils.stream(enumerate(images), load, self.batch_size):
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
                    feature_maps = extractor(preprocessing.tensors(views[start:start + self.batch_size]))
                    if not configure:
                        self._check_feature_shapes(feature_maps)
                    elif not batches:
                        self._configure(method, feature_maps)
                        screen = self._screening_method(method, feature_maps)
                    batches.append(method.features(feature_maps))
                    plain_views = np.array(plain[start:start + self.batch_size])
                    if screen is not method and plain_views.any():  # plain views only: one score per image
                        screen_batches.append(screen.features([m[plain_views] for m in feature_maps]))
                plain_rows += plain
        return _TrainingFeatures(anomaly_model.concatenate_features(batches) if batches else {}, np.array(groups),
                                 np.array(plain_rows, bool), names, image_sizes, screen,
                                 anomaly_model.concatenate_features(screen_batches) if screen_batches else None)

    def _leave_out_defective(self, training, method):
        """Under `contamination`, the training images whose screening scores are outliers ->
        (kept (N,) bool over views, excluded [(group, score, round)])."""
        if self.contamination is None:
            return np.ones(len(training.groups), bool), []
        screen = training.screen
        logger.info('looking for defective training images (contamination %s) by their %s scores, fitted '
                    'without them',
                    self.contamination, screen.name)
        screen_features, screen_groups = ((training.features, training.groups) if screen is method else
                                          (training.screen_features, training.groups[training.plain]))
        screen_kept, excluded = holdout.holdout_without_outliers(screen, screen_features, screen_groups,
                                                                 self.spec.input_size, self.contamination, self.seed)
        for group, score, round_ in excluded:
            logger.warning('excluded training image (held-out %s score %.3f, round %d): %s',
                           screen.name, score, round_, training.names[group])
        logger.info('excluded %d of %d training images', len(excluded), len(training.names))
        return np.isin(training.groups, screen_groups[screen_kept]), excluded

    def _screening_method(self, method, feature_maps):
        """The method (configured) whose held-out scores find defective training images under
        `contamination`: method.screened_by with this detector's options, or `method` itself (also
        where that one cannot use this backbone's outputs)."""
        if self.contamination is None or method.screened_by is None:
            return method
        screen = self._new_method(method.screened_by)
        try:
            screen.configure([m.shape[1:] for m in feature_maps], self.spec.input_size)
        except MethodError:
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
        preprocessing, extractor, method, output_size = self.preprocessing, self.extractor, self.method_, \
            self.spec.input_size
        timer = timer or _untimed

        def load(entry):
            _, (image, mask) = entry
            with timer('decode'):
                view, image_shape = preprocessing.view(image)
                self._check_image_size(image_shape)
                return view, None if mask is None else preprocessing.mask_view(mask, image_shape)

        # Scoring arithmetic stays on this thread: BLAS helper threads would compete with the decoders.
        with tqdm(total=_length(images), desc=desc, unit='img', leave=False, disable=desc is None) as progress, \
                threadpool_limits(1, 'blas'):
            for batch in image_utils.stream(enumerate(_paired(images, masks)), load, self.batch_size):
                progress.update(len(batch))
                good = [(index, loaded) for (index, _), loaded in batch if not isinstance(loaded, ImageError)]
                scored = {}
                if good:
                    views = [view for _, (view, _) in good]
                    with timer('backbone'):
                        feature_maps = extractor(preprocessing.tensors(views))
                    self._check_feature_shapes(feature_maps)
                    with timer('scoring'):
                        scores, maps = method.score(method.features(feature_maps), output_size)
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

    def _check_image_size(self, image_shape):
        """Warn, once, where images differ in size from the training images: a threshold from good images
        promises its rate for images taken like those (a resolution change alone moves the scores: the
        MVTec bottle copy's 900 px test images against its 320 px training images, docs/accuracy.md)."""
        trained = self.meta_.get('train_image_size')
        if trained and tuple(image_shape[::-1]) != tuple(trained) and not self._size_warned:
            self._size_warned = True
            logger.warning('images of %dx%d, the training images were %dx%d: thresholds from good images (--fpr and '
                           'the default) keep their false-positive rate only for images taken like the training '
                           'images; resize these like them, or fit on images of this size', image_shape[1],
                           image_shape[0], *trained)

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
    # thresholds: thresholds_ (a thresholds.Thresholds), chosen by the thresholds module
    # ------------------------------------------------------------------------------------------

    threshold_ = property(lambda self: self.thresholds_ and self.thresholds_.image,
                          doc='Image score threshold: anomalous if score >= threshold_.')
    pixel_threshold_ = property(lambda self: self.thresholds_ and self.thresholds_.pixel,
                                doc='Map value from which a pixel counts as defective (None without maps).')
    threshold_source_ = property(lambda self: self.thresholds_ and self.thresholds_.description,
                                 doc='Where the thresholds came from, as logs and JSON say it.')
    target_fpr_ = property(lambda self: self.thresholds_ and self.thresholds_.target_fpr,
                           doc='The false-positive rate a hold-out threshold guarantees, else None.')

    def set_threshold(self, threshold, source, pixel_threshold=None):
        """The image threshold (and, if given, the pixel threshold) chosen by hand -> self (thresholds.manual)."""
        self._check_fitted()
        self.thresholds_ = thresholds.manual(self.thresholds_, threshold, source, pixel_threshold)
        return self

    def use_holdout_thresholds(self, fpr=None, log=True):
        """Thresholds from the held-out training scores for a false-positive rate -> self
        (thresholds.from_holdout; fpr None: the largest held-out scores)."""
        self._check_fitted()
        self.thresholds_ = thresholds.from_holdout(self.holdout_, fpr, self.localizes, log=log)
        return self

    def calibrate(self, images, masks, source=None, fingerprint=None):
        """F1-optimal image and pixel thresholds from labelled images -> self (thresholds.from_labelled).

        masks: aligned with `images`, None for a normal image, else its mask (path or bool (H, W)
        array; an all-zero mask is a normal image). Without both classes, a warning and the training
        hold-out thresholds. fingerprint: thresholds.labelled_set_fingerprint of the images, kept with
        the thresholds (saved with them, so that later runs on the same set reuse them).
        """
        n = _length(images)
        results = [r for r in self.inspect(images, masks, desc='threshold: labelled images') if not r.error]
        return self.calibrate_results(results, source or f'{n if n is not None else len(results)} labelled images',
                                      fingerprint)

    def calibrate_results(self, results, source='labelled images', fingerprint=None):
        """`calibrate` on already inspected images (Inspection with gt_mask) -> self."""
        self._check_fitted()
        results = [r for r in results if r.error is None]
        labels = [r.gt_mask is not None and bool(r.gt_mask.any()) for r in results]
        self.thresholds_ = thresholds.from_labelled(labels, [r.score for r in results], lambda: pixel_arrays(results),
                                                    source, self.holdout_, self.localizes, fingerprint)
        return self

    # ------------------------------------------------------------------------------------------
    # export and figures
    # ------------------------------------------------------------------------------------------

    def export(self, path, size=None):
        """Write this detector as one ONNX model (export_onnx.export_detector): uint8 RGB images
        (N, H, W, 3) of `size` (width, height; default the training images' shared size) in; score,
        anomaly map and verdict out, as this detector gives them -> self."""
        self._check_fitted()
        export_onnx.export_detector(self, path, size, __version__)
        return self

    def render_figure(self, result, title=''):
        """The four-panel figure of an Inspection with this detector's thresholds -> BGR uint8 image."""
        return plot_utils.render_figure(result.view, result.gt_mask, result.anomaly_map, result.score,
                                        self.threshold_, self.pixel_threshold_, title=title)

    # ------------------------------------------------------------------------------------------
    # saving and loading
    # ------------------------------------------------------------------------------------------

    def save(self, path):
        """Write the fitted state, its settings and the current thresholds to the feature file `path`
        (feature_file.save: an .npz archive, written atomically; loading it cannot execute code)."""
        self._check_fitted()
        feature_file.save(path, dict(self.meta_, thresholds=self.thresholds_.to_meta()), self.method_)
        return self

    @classmethod
    def load(cls, path, model=None, method=None, model_dir='models', model_url=None, batch_size=16,
             max_pixels=image_utils.DEFAULT_MAX_PIXELS, provider=None):
        """A fitted Detector from a feature file, with the thresholds stored in it.

        model: the backbone to run (default: the one the file names); model / method given here must
        match what the file was fitted with (FeatureFileError saying what differs, otherwise).
        """
        meta, fitted = feature_file.load(path)
        feature_file.check_meta(path, meta)
        if model is None:
            model = meta.get('model') or next((key for key, spec in model_utils.MODEL_CATALOGUE.items()
                                               if spec.name == meta.get('backbone')), None)
            if model is None:
                raise FeatureFileError(f'{path} was fitted on {meta.get("backbone")!r}: pass the model it used')
        stored_options = meta.get('method_options', {})
        options = {o.flag: stored_options[o.key] for o in anomaly_model.METHODS[meta['method']].options
                   if o.key in stored_options}
        detector = cls(model, method or meta['method'], model_dir, meta.get('seed', 0), batch_size, model_url,
                       aug_num=meta.get('aug_num', 0), contamination=meta.get('contamination'),
                       max_pixels=max_pixels, provider=provider, **options)
        feature_file.check_settings(path, meta, detector.settings(), feature_file.FEATURE_SETTINGS,
                                    'cannot be used with this backbone and method',
                                    'pass --feat with a new file name to fit one')
        detector.method_, detector.meta_, detector.bit_depth_ = fitted, meta, meta['bit_depth']
        detector.loaded_from_ = path
        detector.thresholds_ = (thresholds.Thresholds.from_meta(meta.get('thresholds'), detector.localizes)
                                or thresholds.from_holdout(detector.holdout_, localizes=detector.localizes, log=False))
        return detector
