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
import conditions
import feature_file
import fusion
import history
import holdout
import image_utils
import model_utils
import plot_utils
import quantize
import thresholds
from errors import FeatureFileError, ImageError, MethodError, ModelError, UsageError

logger = logging.getLogger('mahalanobisad')
__version__ = '0.2.0'  # recorded in exported models


@dataclasses.dataclass
class Inspection:
    """What the detector made of one input, in input order.

    index: position in the input iterable; path: the file given, or None for an array;
    score: image anomaly score (larger = more anomalous); anomaly: score >= threshold;
    view: the network's view of the image, RGB uint8 (S, S, 3), S = the detector's output_size
    (its input size; the largest of several);
    anomaly_map: pixel anomaly scores (S, S) float32, or None for a method without maps;
    gt_mask: ground truth (S, S) bool when a mask was given (None: no mask, i.e. normal);
    error: why the input could not be read (then score, anomaly, view and map are None);
    conditions: the view's brightness, contrast and sharpness against the training images' range
    (conditions.Conditions; its drift is None for a feature file from before ranges were kept).
    """
    index: int
    path: str = None
    score: float = None
    anomaly: bool = None
    view: np.ndarray = None
    anomaly_map: np.ndarray = None
    gt_mask: np.ndarray = None
    error: str = None
    conditions: 'conditions.Conditions' = None


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
    """What the fit reads from its images. features: per input size, the method's {name: (N, ...)}
    over the N views; groups (N,): each view's image index; plain (N,) bool: the unaugmented view;
    names {index: shown name}; image_sizes {(W, H)}; measures {index: (3,) conditions.measure of its
    plain view at the first input size} and pooled [(n, C)] conditions.stride_maps of those plain views,
    rows in that order; screen: the method whose held-out scores find defective images (at the first
    input size), and screen_features its features of the plain views (None where screen is the first
    size's method itself)."""
    features: dict
    groups: np.ndarray
    plain: np.ndarray
    names: dict
    image_sizes: set
    measures: dict
    pooled: list
    screen: anomaly_model.AnomalyMethod
    screen_features: dict = None


class Detector:
    """An anomaly detector on pretrained features: one backbone, one method (at one or more input
    sizes), its thresholds.

    Parameters: model ('lite0', 'lite1', 'lite2', 'b0'..'b7' or a path to an .onnx feature
    extractor), method ('mahalanobis', 'padim', 'spade', 'patchcore'), model_dir (cache of ONNX
    backbones), seed (augmentation, channel subsets, coresets, folds), batch_size (images per
    backbone run), model_url (base URL of b0..b7 downloads), aug_num (augmented views per training
    image; 0 = none), contamination (None: trust every training image; 'auto' or a fraction in
    (0, 0.5): leave out the training images that look defective, see `fit`), max_pixels (image files
    larger than this, width x height, are refused from their header before decoding: see
    image_utils), provider (onnxruntime execution provider of the backbone; None = CPU), int8 (quantize
    the backbone to 8 bits at fit time, calibrated on the training images: quantize.py), input_size
    (the side of the square network input: None for the backbone's own, 224 for lite0; an int, a
    multiple of 32 in 64..1024; or several, each fitted on its own and their scores fused: see
    fusion), aug_rotate (the augmentation's rotation range, +- degrees in 0..180), and the methods'
    options by their flags (padim_dims, spade_k, coreset_ratio: anomaly_model.Option; a method uses
    its own, the defaults are the methods'). The backbone is opened on first use, so constructing a
    Detector is cheap and offline.

    Fitted attributes: methods_ (the fitted anomaly_model.AnomalyMethod of each input size, in
    input_sizes order; method_ is the first), meta_ (what produced it: backbone, settings,
    n_train_images, held-out scores (the fused ones with several sizes, each size's own in
    scale_holdout), excluded_train_images), footings_ (each size's fusion.Footing; None with one
    size), thresholds_ (the thresholds.Thresholds deciding verdicts; threshold_, pixel_threshold_,
    threshold_source_ and target_fpr_ read them), int8_backbone_ (with int8: the quantized backbone, a
    serialized ONNX model (bytes) saved in the feature file and used as it is by every later run),
    bit_depth_ (significant bits of 16-bit image files, learnt from the training images: 8 when they
    were all 8-bit; see image_utils.load_view), conditions_ (the training images' range of brightness,
    contrast and sharpness, conditions.ConditionRange, measured at the first input size; None for a
    feature file from before it was kept), loaded_from_ (the feature file `load` read, or None).

    images, everywhere: an iterable of file paths and/or RGB uint8 arrays (H, W, 3) of any size,
    streamed through a bounded thread pool (memory flat in the number of images, decoding overlapped
    with inference).
    """

    def __init__(self, model=model_utils.DEFAULT_MODEL, method='mahalanobis', model_dir='models', seed=0,
                 batch_size=16, model_url=None, aug_num=0, contamination=None,
                 max_pixels=image_utils.DEFAULT_MAX_PIXELS, provider=None, int8=False, input_size=None,
                 aug_rotate=image_utils.AUG_MAX_ROTATION_DEG, **method_options):
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
        if not isinstance(int8, bool):
            raise UsageError(f'int8 must be True or False, got {int8!r}')
        self.int8 = int8
        self.contamination = holdout.check_contamination(contamination)
        self.max_pixels = int(max_pixels)
        self.input_size = model_utils.check_input_sizes(input_size)
        self.aug_rotate = image_utils.check_rotation(aug_rotate)
        self.methods_ = self.meta_ = self.thresholds_ = self.bit_depth_ = self.conditions_ = self.loaded_from_ = None
        self.footings_ = self.int8_backbone_ = None
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
        """The backbone: model_utils.FeatureExtractor, (N, 3, S, S) float32 -> feature maps (the int8
        backbone once there is one)."""
        if self.int8_backbone_ is not None:
            return quantize.open_quantized(self.int8_backbone_, self.provider)
        return model_utils.open_backbone(self.model, self.model_dir, self.model_url, self.provider)[1]

    @property
    def input_sizes(self):
        """The sides of the square network inputs, ascending: input_size, else the backbone's own."""
        return self.input_size or (self.spec.input_size,)

    @property
    def output_size(self):
        """Side of the views, maps and masks: the (largest) input size."""
        return max(self.input_sizes)

    @property
    def method_(self):
        """The fitted method (of the first input size; methods_ holds each size's), or None."""
        return self.methods_[0] if self.methods_ else None

    @property
    def preprocessing(self):
        """How an image becomes this detector's network inputs (image_utils.Preprocessing)."""
        spec = self.spec
        return image_utils.Preprocessing(self.input_sizes, spec.mean, spec.std, self.bit_depth_, self.max_pixels,
                                         self.aug_rotate, (self.meta_ or {}).get('train_image_size'))

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
        FIT_SETTINGS but train_dir). input_size and resize_size: ints for one input size, lists for several."""
        spec, sizes = self.spec, self.input_sizes
        resize_sizes = [image_utils.resize_size_for(size) for size in sizes]
        one = len(sizes) == 1
        return {'backbone': spec.name, 'input_size': sizes[0] if one else list(sizes),
                'resize_size': resize_sizes[0] if one else resize_sizes,
                'mean': list(spec.mean), 'std': list(spec.std), 'feature_names': self.extractor.output_names,
                'method': self.method, 'method_options': dict(self._new_method().params),
                'aug': self.aug_num > 0, 'aug_num': self.aug_num,
                'aug_rotate': self.aug_rotate if self.aug_num else None, 'seed': self.seed,
                'contamination': self.contamination, 'int8': self.int8}

    def _check_backbone_input(self):
        """UsageError where the backbone's graph fixes an input size other than this detector's."""
        shape = self.extractor.session.get_inputs()[0].shape[2:]
        fixed = [n for n in shape if isinstance(n, int)]
        if fixed and any(size not in fixed for size in self.input_sizes):
            raise UsageError(f'{self.spec.name} takes only {shape[-1]} x {shape[-2]} inputs, not input size '
                             f'{", ".join(map(str, self.input_sizes))}')

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
        recorded in meta_['excluded_train_images']. With several input sizes, the method is fitted at
        each on the same views, each size's held-out scores are kept (meta_['scale_holdout']) and
        fused (fusion), and the thresholds come from the fused ones; contamination is screened at the
        first (smallest) size and every size is fitted without the images it leaves out. source: what
        the images are (the CLI passes the training directory), recorded in meta_. The bit depth of
        16-bit image files is learnt first (bit_depth_), so `images` is read twice when it holds such
        files (an iterator is turned into a list for that). The fit is the first entry of
        meta_['history'] (history.py), with the sha256 of every image fitted on; by: who fitted
        (default the OS user).
        """
        if not isinstance(images, collections.abc.Sequence):
            images = list(images)
        self._check_backbone_input()
        self.meta_ = None  # a previous fit's: its training images' size must not shape these views
        self.bit_depth_ = image_utils.learn_bit_depth([i for i in images if not isinstance(i, np.ndarray)],
                                                      self.max_pixels)
        if self.bit_depth_ > 8:
            logger.info('training images hold %d-bit data in 16-bit files: 0..%d is read as 0..255 for them and '
                        'every later image', self.bit_depth_, (1 << self.bit_depth_) - 1)
        methods = [self._new_method() for _ in self.input_sizes]
        self.int8_backbone_, int8_meta = self._quantized_backbone(images) if self.int8 else (None, None)
        training = self._training_features(images, methods)
        n_images = len(training.names)
        if n_images < 2:
            raise UsageError(f'need at least 2 readable training images, found {n_images}')
        kept, excluded = self._leave_out_defective(training, methods[0])
        groups = training.groups[kept]
        logger.info('fitting %s on %d views of %d images at input size %s', methods[0].name, len(groups),
                    n_images - len(excluded), ' and '.join(map(str, self.input_sizes)))
        scale_holdout = []
        for method, features in zip(methods, training.features):
            features = anomaly_model.select_features(features, kept)
            method.fit(features)
            scale_holdout.append(holdout.HoldoutScores(*holdout.holdout_scores(method, features, groups,
                                                                                self.output_size)))
            if method.keeps_training and len(methods) == 1:  # what teaching adds to (not with several sizes)
                method.keep_training(features, groups)
        self.methods_ = methods
        self.footings_ = [fusion.Footing.of(h) for h in scale_holdout] if len(methods) > 1 else None
        held_out = fusion.fuse_holdout(scale_holdout, self.footings_) if self.footings_ else scale_holdout[0]
        kept_images = np.isin(list(training.measures), np.unique(groups))
        self.conditions_ = conditions.ConditionRange.fit(np.array(list(training.measures.values()))[kept_images],
                                                         [p[kept_images] for p in training.pooled], seed=self.seed)
        self.meta_ = dict(self.settings(), model=self.model, train_dir=source, n_train_images=n_images - len(excluded),
                          bit_depth=self.bit_depth_, **held_out.to_meta(),
                          excluded_train_images=[training.names[group] for group, _, _ in excluded],
                          train_image_size=(list(training.image_sizes.pop()) if len(training.image_sizes) == 1
                                            else None), int8_backbone=int8_meta, conditions=self.conditions_.to_meta())
        if self.footings_:
            self.meta_['scale_holdout'] = [h.to_meta() for h in scale_holdout]
        self.thresholds_ = thresholds.from_holdout(held_out, localizes=self.localizes, log=False)
        excluded_groups = {group for group, _, _ in excluded}
        fitted = [(training.names[i], history.image_sha256(images[i])) for i in sorted(training.names)
                  if i not in excluded_groups]
        self.meta_['history'] = [history.new_entry([], 'fit', by, fitted, None, self.thresholds_.to_meta(),
                                                   self.meta_['n_train_images'])]
        return self

    def _quantized_backbone(self, images):
        """The backbone quantized to int8 on the network views of quantize.calibration_sample(images)
        -> (serialized model, what the feature file records of it: how it was made, sha256, bytes).
        Calibrated at the first (smallest) input size: activation ranges of these convolutional
        networks hardly move with the input size."""
        preprocessing = dataclasses.replace(self.preprocessing, input_sizes=self.input_sizes[:1])
        sample = [images[i] for i in quantize.calibration_sample(len(images), self.seed)]
        views = []  # an unreadable image is left out here, and reported by the fit that follows
        for batch in image_utils.stream(sample, preprocessing.views, self.batch_size):
            views += [loaded[0][0] for _, loaded in batch if not isinstance(loaded, ImageError)]
        if not views:
            raise UsageError('none of the images sampled to calibrate the int8 backbone could be read')
        model_bytes, made = quantize.quantize_backbone(model_utils.open_backbone(
            self.model, self.model_dir, self.model_url, self.provider)[1].onnx_path, preprocessing.tensors(views))
        return model_bytes, dict(made, sha256=quantize.sha256(model_bytes), bytes=len(model_bytes))

    def partial_fit(self, images, by=None):
        """Teach the fitted detector more good images, without refitting -> self.

        AnomalyMethod.partial_fit: the Gaussians are estimated again from their kept training rows and the
        new ones, exactly, at a cost linear in the rows (a kept eigenbasis and Woodbury's identity, not a
        refit), and every image's held-out score is computed again under the updated model (leave one
        image out, as the fit does); SPADE appends and PatchCore extends its coreset, the new images' held-out
        scores joining the earlier ones (which can only have fallen: see added_holdout_scores). The
        thresholds follow by their rule (`_thresholds_after_change`). An image already taught (same sha256) is skipped with a note,
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
        if len(self.methods_) > 1:
            raise UsageError('teaching a detector fitted at several input sizes is not supported: fit it again '
                             'with the images added to the training folder')
        fresh, digests, skipped = self._new_images(images, known)
        training = self._training_features(fresh, self.methods_, configure=False)
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
        method = self.method_
        method.partial_fit(training.features[0], training.groups)
        if method.keeps_training:
            held_out = holdout.HoldoutScores(*holdout.holdout_scores(method, method.training_, method.training_groups_,
                                                                     self.output_size))
        else:
            scores, maxima = method.added_holdout_scores(training.features[0], training.groups, self.output_size)
            old = self.holdout_
            held_out = holdout.HoldoutScores(
                np.concatenate([old.image, scores]),
                None if maxima is None or old.pixel_maxima is None else np.concatenate([old.pixel_maxima, maxima]))
        self.meta_.update(held_out.to_meta(), n_train_images=self.meta_['n_train_images'] + count)

    def _learn_defects(self, training, count):
        logger.info('keeping the features of %d labelled defects', count)
        plain = anomaly_model.select_features(training.features[0], training.plain)
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
            scores = self.method_.score(defects, self.output_size)[0]
            return thresholds.from_holdout_and_defects(self.holdout_, scores, fpr, self.localizes)
        if current.rule == thresholds.HOLDOUT:
            return thresholds.from_holdout(self.holdout_, fpr, self.localizes, log=True)
        logger.warning('the %s thresholds (%s) were chosen for the model before this change: using the training '
                       'hold-out until they are derived again', current.rule, current.source)
        return thresholds.from_holdout(self.holdout_, localizes=self.localizes, log=True)

    def _training_features(self, images, methods, configure=True):
        """Stream the training images through the backbone at each input size -> _TrainingFeatures;
        configures each size's method in `methods` (and the screening method) on its first batch's
        feature maps, unless configure is False (fitted methods: the maps' shapes are checked against
        them)."""
        preprocessing, extractor = self.preprocessing, self.extractor
        batches, screen_batches, groups, plain_rows, names, image_sizes = [[] for _ in methods], [], [], [], {}, set()
        measures, pooled_batches = {}, []
        screen = methods[0]
        with tqdm(total=_length(images), desc='fit: features', unit='img') as progress, \
                threadpool_limits(1, 'blas'):
            load = lambda item: preprocessing.training_views(item[1], item[0], self.aug_num, self.seed)  # noqa: E731
            for batch in image_utils.stream(enumerate(images), load, self.batch_size):
                progress.update(len(batch))
                views, plain = [[] for _ in methods], []
                for (index, image), loaded in batch:
                    if isinstance(loaded, ImageError):
                        logger.warning('skipping training image: %s', loaded)
                        continue
                    names[index] = (f'array #{index}' if isinstance(image, np.ndarray)
                                    else image_utils.display_path(image))
                    scale_views, (height, width) = loaded
                    for scale, item_views in enumerate(scale_views):
                        views[scale] += item_views
                    plain += [True] + [False] * (len(scale_views[0]) - 1)
                    groups += [index] * len(scale_views[0])
                    image_sizes.add((width, height))
                    measures[index] = conditions.measure(scale_views[0][0])
                for scale, (method, size) in enumerate(zip(methods, self.input_sizes)):
                    for start in range(0, len(views[scale]), self.batch_size):
                        feature_maps = extractor(preprocessing.tensors(views[scale][start:start + self.batch_size]))
                        if not configure:
                            self._check_feature_shapes(method, feature_maps)
                        elif not batches[scale]:
                            self._configure(method, feature_maps, size, warn=scale == 0)
                            if scale == 0:
                                screen = self._screening_method(method, feature_maps)
                        batches[scale].append(method.features(feature_maps))
                        if scale > 0:
                            continue
                        plain_views = np.array(plain[start:start + self.batch_size])
                        plain_maps = [m[plain_views] for m in feature_maps]  # one per image
                        if screen is not method and plain_views.any():
                            screen_batches.append(screen.features(plain_maps))
                        pooled_batches.append(conditions.stride_maps(plain_maps, size))
                plain_rows += plain
        return _TrainingFeatures([anomaly_model.concatenate_features(b) if b else {} for b in batches],
                                 np.array(groups), np.array(plain_rows, bool), names, image_sizes, measures,
                                 [np.concatenate(level) for level in zip(*pooled_batches)], screen,
                                 anomaly_model.concatenate_features(screen_batches) if screen_batches else None)

    def _leave_out_defective(self, training, method):
        """Under `contamination`, the training images whose screening scores (at the first input size)
        are outliers -> (kept (N,) bool over views, excluded [(group, score, round)])."""
        if self.contamination is None:
            return np.ones(len(training.groups), bool), []
        screen = training.screen
        logger.info('looking for defective training images (contamination %s) by their %s scores, fitted '
                    'without them',
                    self.contamination, screen.name)
        screen_features, screen_groups = ((training.features[0], training.groups) if screen is method else
                                          (training.screen_features, training.groups[training.plain]))
        screen_kept, excluded = holdout.holdout_without_outliers(screen, screen_features, screen_groups,
                                                                 self.output_size, self.contamination, self.seed)
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
            screen.configure([m.shape[1:] for m in feature_maps], self.input_sizes[0])
        except MethodError:
            return method
        return screen

    def _configure(self, method, feature_maps, input_size, warn=True):
        """Fit `method` to this backbone's outputs at `input_size`; warn (if `warn`) if it cannot draw maps."""
        method.configure([m.shape[1:] for m in feature_maps], input_size)
        if warn and not method.localizes:
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
        preprocessing, extractor = self.preprocessing, self.extractor
        timer = timer or _untimed

        def load(entry):
            _, (image, mask) = entry
            with timer('decode'):
                views, image_shape = preprocessing.views(image)
                self._check_image_size(image_shape)
                return views, None if mask is None else preprocessing.mask_view(mask, image_shape)

        # Scoring arithmetic stays on this thread: BLAS helper threads would compete with the decoders.
        with tqdm(total=_length(images), desc=desc, unit='img', leave=False, disable=desc is None) as progress, \
                threadpool_limits(1, 'blas'):
            for batch in image_utils.stream(enumerate(_paired(images, masks)), load, self.batch_size):
                progress.update(len(batch))
                good = [(index, loaded) for (index, _), loaded in batch if not isinstance(loaded, ImageError)]
                scored = {}
                if good:
                    scores, maps, ratios = self._score([views for _, (views, _) in good], preprocessing, extractor,
                                                       timer)
                    # The view shown is the largest (the maps' geometry); conditions are measured on the
                    # first size's view, as they were at fit.
                    scored = {index: (float(score), views[-1], None if maps is None else maps[i], gt_mask,
                                      None if ratios is None else ratios[i], views[0])
                              for i, ((index, (views, gt_mask)), score) in enumerate(zip(good, scores))}
                for (index, (image, _)), loaded in batch:
                    path = None if isinstance(image, np.ndarray) else os.fspath(image)
                    if isinstance(loaded, ImageError):
                        logger.warning('skipping: %s', loaded)
                        yield Inspection(index, path, error=str(loaded))
                        continue
                    score, view, anomaly_map, gt_mask, ratio, first_view = scored[index]
                    yield Inspection(index, path, score, bool(score >= self.threshold_), view, anomaly_map, gt_mask,
                                     conditions=conditions.judge(conditions.measure(first_view), self.conditions_,
                                                                 ratio))

    def _check_image_size(self, image_shape):
        """Say, once, where images differ in size from the training images: one of their aspect ratio is
        brought to their size first (image_utils.to_training_size: a resolution change alone moves the
        scores, docs/thresholds.md); of another, a warning: a threshold from good images promises its
        rate for images taken like the training images."""
        trained = self.meta_.get('train_image_size')
        if not trained or tuple(image_shape[::-1]) == tuple(trained) or self._size_warned:
            return
        self._size_warned = True
        if image_utils.training_size_shape(*image_shape, trained) is not None:
            logger.info('images of %dx%d are brought to the training images\' %dx%d before their network views, '
                        'as the training images were made', image_shape[1], image_shape[0], *trained)
            return
        logger.warning('images of %dx%d, the training images were %dx%d (another aspect ratio): thresholds from good '
                       'images (--fpr and the default) keep their false-positive rate only for images taken like '
                       'the training images; crop these like them, or fit on images of this shape', image_shape[1],
                       image_shape[0], *trained)

    def _score(self, views, preprocessing, extractor, timer):
        """Views of N images (each a list, one view per input size) -> (image scores (N,), maps (N, S, S)
        float32 or None, S = output_size: the method's at each size, fused across sizes (fusion); the
        feature-level conditions ratio of each image at the first size (N,), or None without ranges)."""
        results, ratios = [], None
        for scale, (method, size) in enumerate(zip(self.methods_, self.input_sizes)):
            with timer('backbone'):
                feature_maps = extractor(preprocessing.tensors([image_views[scale] for image_views in views]))
            self._check_feature_shapes(method, feature_maps)
            with timer('scoring'):
                results.append(method.score(method.features(feature_maps), self.output_size))
                if scale == 0 and self.conditions_ is not None:
                    ratios = self.conditions_.feature_ratios(feature_maps, size)
        if self.footings_ is None:
            return results[0][0], results[0][1], ratios
        with timer('scoring'):
            scores = fusion.fuse([scores for scores, _ in results], self.footings_)
            maps = (None if results[0][1] is None else
                    fusion.fuse([maps for _, maps in results], self.footings_, 'pixel').astype(np.float32))
        return scores, maps, ratios

    def _check_feature_shapes(self, method, feature_maps):
        """FeatureFileError unless the backbone's maps have the shapes `method`'s fitted state was built
        on (a feature file can name this backbone and still hold another's shapes)."""
        shapes = [list(m.shape[1:]) for m in feature_maps]
        fitted = method.params.get('feature_shapes')
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
        (thresholds.from_holdout; fpr None: the default, FPR 0.01, or the largest held-out score
        where fewer than 99 images cannot certify that)."""
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
        import export_onnx  # it imports onnx (0.6-0.9 s of start-up), which only exporting needs
        export_onnx.export_detector(self, path, size, __version__)
        return self

    def render_figure(self, result, title=''):
        """The four-panel figure of an Inspection with this detector's thresholds -> BGR uint8 image."""
        return plot_utils.render_figure(result.view, result.gt_mask, result.anomaly_map, result.score,
                                        self.threshold_, self.pixel_threshold_, title=title)

    # ------------------------------------------------------------------------------------------
    # saving and loading
    # ------------------------------------------------------------------------------------------

    def load_options(self):
        """The keywords of Detector.load that run a feature file as this detector runs (backbone, method,
        cache, batch size, limits, execution provider)."""
        return dict(model=self.model, method=self.method, model_dir=self.model_dir, model_url=self.model_url,
                    batch_size=self.batch_size, max_pixels=self.max_pixels, provider=self.provider)

    def save(self, path):
        """Write the fitted state, its settings and the current thresholds to the feature file `path`
        (feature_file.save: an .npz archive, written atomically; loading it cannot execute code)."""
        self._check_fitted()
        feature_file.save(path, dict(self.meta_, thresholds=self.thresholds_.to_meta()), self.methods_,
                          self.int8_backbone_)
        return self

    @classmethod
    def load(cls, path, model=None, method=None, model_dir='models', model_url=None, batch_size=16,
             max_pixels=image_utils.DEFAULT_MAX_PIXELS, provider=None, int8=None, input_size=None):
        """A fitted Detector from a feature file, with the thresholds stored in it.

        model: the backbone to run (default: the one the file names); model / method / int8 /
        input_size given here must match what the file was fitted with (FeatureFileError saying what
        differs, otherwise); int8 and input_size None: as the file was fitted. An int8 file's quantized
        backbone is used as stored (never quantized again).
        """
        meta, fitted, int8_backbone = feature_file.load(path)
        feature_file.check_meta(path, meta)
        if meta.get('aug_num') and 'aug_rotate' not in meta:  # a file from before the rotation range was chosen
            meta['aug_rotate'] = image_utils.AUG_MAX_ROTATION_DEG
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
                       max_pixels=max_pixels, provider=provider, int8=meta['int8'] if int8 is None else int8,
                       aug_rotate=(image_utils.AUG_MAX_ROTATION_DEG if meta.get('aug_rotate') is None
                                   else meta['aug_rotate']), **options)
        if int8_backbone is not None:
            try:
                quantize.open_quantized(int8_backbone, provider)
            except ModelError as e:
                raise FeatureFileError(f'{path}: damaged feature file: {e}') from None
            detector.int8_backbone_ = int8_backbone
        stored = meta['input_size']
        stored_sizes = tuple(stored) if isinstance(stored, list) else (stored,)
        if stored_sizes != detector.input_sizes:  # else the backbone's own size, left to it
            detector.input_size = stored_sizes
        if input_size is not None and model_utils.check_input_sizes(input_size) != stored_sizes:
            asked = model_utils.check_input_sizes(input_size)
            raise FeatureFileError(f'{path} was fitted at input size {" ".join(map(str, stored_sizes))}, not '
                                   f'{" ".join(map(str, asked))}: pass --feat with a new file name to fit one at '
                                   'that size, or leave --input_size out to use this one\'s')
        feature_file.check_settings(path, meta, detector.settings(), feature_file.FEATURE_SETTINGS,
                                    'cannot be used with this backbone and method',
                                    'pass --feat with a new file name to fit one')
        detector.methods_, detector.meta_, detector.bit_depth_ = fitted, meta, meta['bit_depth']
        detector.conditions_ = conditions.ConditionRange.from_meta(meta.get('conditions'))
        detector.loaded_from_ = path
        if len(fitted) > 1:
            detector.footings_ = [fusion.Footing.of(holdout.HoldoutScores.from_meta(h)) for h in meta['scale_holdout']]
        detector.thresholds_ = (thresholds.Thresholds.from_meta(meta.get('thresholds'), detector.localizes)
                                or thresholds.from_holdout(detector.holdout_, localizes=detector.localizes, log=False))
        return detector
