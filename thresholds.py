"""Thresholds: where a score becomes a verdict, and which rule chose the score it is compared with.

A `Thresholds` holds the image threshold (anomalous if score >= image), the pixel threshold of the
maps, and how they were chosen: the rule (HOLDOUT, F1 or MANUAL), its source for people, the
false-positive rate it guarantees, the labelled set it holds for, and whether it was reused from a
feature file. Everything that chooses thresholds is here, as functions returning a new Thresholds:

- `from_holdout`: the conformal order statistic of held-out training scores, for a stated FPR;
- `from_labelled`: F1-optimal on labelled images (the hold-out where they lack a class);
- `manual`: a value chosen by a person (--threshold, the web console);
- `choose`: the command line's policy between them (flags, labelled folders, stored thresholds).
"""
import dataclasses
import hashlib
import json
import logging
import os

import numpy as np

import image_utils
from errors import UsageError

logger = logging.getLogger('mahalanobisad')

HOLDOUT, F1, MANUAL = 'holdout', 'F1-optimal', 'manual'
RULES = (HOLDOUT, F1, MANUAL)
HOLDOUT_SOURCE = 'training hold-out'
# Without labelled images and without --fpr: flag at most 1 normal part in 100, or, with fewer than 99
# training images (which cannot certify that), the largest held-out score (FPR <= 1/(n + 1)). Chosen on
# MVTec (docs/accuracy.md): against the largest score of 209-220 images (FPR <= 0.005), 0.01 found more
# defects in 6 of 8 category-method pairs, fewer in none (metal_nut MahalanobisAD 33% -> 48%), for one more good test
# image flagged in 2 of them.
DEFAULT_FPR = 0.01
STORED_PREFIX = 'stored: '  # shown before the source of thresholds reused from a feature file
CALIBRATION_RULE = F1  # recorded in a labelled set's fingerprint: another rule means recalibrating
DEFAULT_TEST_DIR, DEFAULT_GT_DIR = 'images', 'gt_masks'


# ----------------------------------------------------------------------------------------------
# The rules, on plain scores
# ----------------------------------------------------------------------------------------------

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


def f1_optimal_threshold(labels, scores):
    """The score threshold (anomalous if score >= threshold) that maximises F1, and that F1.

    labels: bool (M,), true = anomalous; scores: (M,). Needs both classes.
    """
    from sklearn.metrics import precision_recall_curve  # here: importing sklearn.metrics costs every run 0.5 s
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


def check_fpr(fpr):
    """A false-positive rate in (0, 1) -> float; else UsageError."""
    return open_fraction(fpr, 1, f'fpr must be in (0, 1), got {fpr!r}')


def open_fraction(value, high, message):
    """value as a float if it is a number (not a bool) in (0, high), else UsageError(message)."""
    try:
        number = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not 0 < number < high:
        raise UsageError(message)
    return number


# ----------------------------------------------------------------------------------------------
# The thresholds of a detector
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Thresholds:
    """image: anomalous if score >= image; pixel: map value from which a pixel counts as defective
    (None for a method without maps); rule: HOLDOUT, F1 or MANUAL; source: how they were derived, in
    words ('training hold-out, FPR 0.05', 'F1-optimal on images + gt_masks', '--threshold'); n: the
    images they were derived from; target_fpr: the false-positive rate a HOLDOUT threshold
    guarantees; labelled: labelled_set_fingerprint of the set they hold for (reused for that set
    without scoring it again); calibration: F1 figures of an F1 rule; stored: reused from a feature
    file as they were saved there."""
    image: float
    pixel: float = None
    rule: str = HOLDOUT
    source: str = HOLDOUT_SOURCE
    n: int = None
    target_fpr: float = None
    labelled: dict = None
    calibration: dict = None
    stored: bool = False

    @property
    def description(self):
        """The source as logs, JSON and the console show it ('stored: ...' when reused from a file)."""
        return STORED_PREFIX + self.source if self.stored else self.source

    def to_meta(self):
        """The JSON-able record the feature file keeps."""
        return {'image': self.image, 'pixel': self.pixel, 'source': self.source, 'rule': self.rule,
                'target_fpr': self.target_fpr, 'labelled': self.labelled, 'calibration': self.calibration}

    @classmethod
    def from_meta(cls, stored, localizes):
        """The thresholds a feature file saved (see to_meta); None where it saved none. (A file of the
        first version 3 has no rule: a hold-out source says which.)"""
        if not stored or stored.get('image') is None:
            return None
        rule = stored.get('rule') or (HOLDOUT if stored['source'].startswith(HOLDOUT_SOURCE) else F1)
        calibration = stored.get('calibration')
        return cls(stored['image'], stored['pixel'] if localizes else None, rule, stored['source'],
                   target_fpr=stored.get('target_fpr'), labelled=stored.get('labelled'),
                   calibration=calibration if isinstance(calibration, dict) else None)


def from_holdout(holdout, fpr=None, localizes=True, image=None, log=True):
    """Thresholds from the held-out scores of the n training images (holdout.HoldoutScores), for a
    false-positive rate.

    fpr: a new normal image is flagged (image threshold), or shows any pixel at or above the pixel
    threshold, with probability at most fpr (conformal_threshold on the held-out image scores, and on
    each held-out image's largest pixel score). None: the default, DEFAULT_FPR where n >= 1/DEFAULT_FPR - 1,
    else the largest held-out scores (the same rule for fpr = 1/(n + 1)). With n < 1/fpr - 1 no
    threshold can guarantee fpr: a warning, and the largest scores. image: keep this Thresholds' image
    threshold and take only the pixel one.
    """
    n = len(holdout.image)
    target = max(DEFAULT_FPR, 1 / (n + 1)) if fpr is None else check_fpr(fpr)
    if image is None:
        value, certified = conformal_threshold(holdout.image, target)
        achieved = target if certified else 1 / (n + 1)
        if not certified:
            logger.warning('%d held-out training images cannot guarantee FPR %g (that needs at least %d): '
                           'using the largest score', n, target, int(np.ceil(1 / target - 1)))
        if not certified or (fpr is None and target != DEFAULT_FPR):  # the largest score
            source = HOLDOUT_SOURCE
        elif fpr is None:
            source = f'{HOLDOUT_SOURCE}, default FPR {target:g}'
        else:
            source = f'{HOLDOUT_SOURCE}, FPR {target:g}'
        image = Thresholds(value, rule=HOLDOUT, source=source, n=n, target_fpr=achieved)
        if log:
            logger.info('image threshold %.3f (%s) from %d held-out training images: a new normal image is '
                        'flagged with probability at most %.4f', value, source, n, achieved)
    if not localizes:
        pixel = None
    elif holdout.pixel_maxima is None:  # a feature file from before per-image maxima were kept
        pixel = holdout.pixel_max
    else:
        pixel = conformal_threshold(holdout.pixel_maxima, target)[0]
    if log and localizes:
        logger.info('pixel threshold %.3f: a held-out normal image has any pixel above it with '
                    'probability at most %.4f', pixel, max(target, 1 / (n + 1)))
    return dataclasses.replace(image, pixel=pixel)


def from_labelled(labels, scores, pixel_labels_and_maps, source, holdout, localizes, fingerprint=None):
    """F1-optimal image and pixel thresholds from labelled images -> Thresholds.

    labels (M,) bool, true = anomalous; scores (M,); pixel_labels_and_maps: a function returning
    (masks (M, S, S) bool, maps (M, S, S)), called only where the maps are used. Without both classes,
    a warning and the hold-out thresholds (never a threshold from one class). fingerprint: the
    labelled set's (labelled_set_fingerprint), kept so that later runs on that set reuse them.
    """
    labels = np.asarray(labels, bool)
    if not labels.any() or labels.all():
        logger.warning('%s has %s: cannot derive an F1-optimal threshold', source,
                       'no defect masks' if not labels.any() else 'no normal images')
        # What this set gives, so it is not scored again for the same answer.
        return dataclasses.replace(from_holdout(holdout, localizes=localizes), labelled=fingerprint)
    threshold, f1 = f1_optimal_threshold(labels, scores)
    calibration = {'image_f1': f1, 'n_images': len(labels), 'n_anomalous': int(labels.sum())}
    logger.info('image threshold %.3f maximises F1 (%.3f) on %d labelled images (%d anomalous)',
                threshold, f1, len(labels), labels.sum())
    chosen = Thresholds(threshold, rule=F1, source=f'F1-optimal on {source}', n=len(labels),
                        labelled=fingerprint, calibration=calibration)
    if not localizes:
        return from_holdout(holdout, localizes=localizes, image=chosen, log=True)
    pixel, pixel_f1 = f1_optimal_threshold(*pixel_labels_and_maps())
    logger.info('pixel threshold %.3f maximises pixel F1 (%.3f)', pixel, pixel_f1)
    return dataclasses.replace(chosen, pixel=pixel, calibration=dict(calibration, pixel_f1=pixel_f1))


def from_holdout_and_defects(holdout, defect_scores, fpr=None, localizes=True):
    """Thresholds from the training images' held-out scores (normal images, as a new one would score)
    and the scores of labelled defects (Detector.add_defects) -> Thresholds with calibration
    {n_good, n_defects, recall, holdout_fpr}: the share of the defects flagged and of the held-out good
    images flagged.

    fpr given: the hold-out threshold at that rate (from_holdout), its recall on the defects measured;
    None: the F1-optimal image threshold between held-out good images and defects. The pixel threshold
    is the hold-out's either way (a labelled defect's mask, if any, is not kept).
    """
    defect_scores = np.asarray(defect_scores, np.float64)
    n, k = len(holdout.image), len(defect_scores)
    if fpr is not None:
        chosen = from_holdout(holdout, fpr, localizes, log=False)
    else:
        threshold, f1 = f1_optimal_threshold(np.r_[np.zeros(n, bool), np.ones(k, bool)],
                                             np.r_[holdout.image, defect_scores])
        chosen = from_holdout(holdout, localizes=localizes, log=False, image=Thresholds(
            threshold, rule=F1, source=f'F1-optimal on {n} held-out good images + {k} labelled defects', n=n + k))
    calibration = {'n_good': n, 'n_defects': k, 'recall': float(np.mean(defect_scores >= chosen.image)),
                   'holdout_fpr': float(np.mean(holdout.image >= chosen.image))}
    logger.info('image threshold %.3f (%s): flags %.1f%% of %d labelled defects and %.1f%% of %d held-out good images',
                chosen.image, chosen.source, 100 * calibration['recall'], k, 100 * calibration['holdout_fpr'], n)
    return dataclasses.replace(chosen, calibration=calibration)


def manual(current, threshold, source, pixel_threshold=None):
    """`current` with the image threshold (and, if given, the pixel threshold) chosen by hand; source:
    why, for logs and files. The labelled set stays: a threshold chosen by hand for a calibrated set
    (say in the web console), once saved, is reused by later runs with that set until it changes."""
    threshold = float(threshold)
    if not np.isfinite(threshold):
        raise UsageError(f'threshold must be a finite number, got {threshold}')
    logger.info('image threshold %.3f from %s', threshold, source)
    return dataclasses.replace(current, image=threshold, rule=MANUAL, source=source, target_fpr=None, stored=False,
                               pixel=current.pixel if pixel_threshold is None else float(pixel_threshold))


def recalibration_reason(thresholds, fingerprint):
    """Why `thresholds` do not hold for the labelled set `fingerprint` (labelled_set_fingerprint)
    -> str, or None if they do. fingerprint None (no labelled set to check against): they hold,
    whatever they were derived from."""
    stored = thresholds.labelled
    if fingerprint is None or stored == fingerprint:
        return None
    if stored is None:
        return f'the thresholds ({thresholds.source}) were not derived from labelled images'
    if stored['settings'] != fingerprint['settings']:
        return f'threshold settings changed ({stored["settings"]} -> {fingerprint["settings"]})'
    return (f'the labelled set changed ({stored["n_images"]} images + {stored["n_masks"]} masks -> '
            f'{fingerprint["n_images"]} + {fingerprint["n_masks"]}, or files added, replaced or touched)')


# ----------------------------------------------------------------------------------------------
# Labelled images, and the command line's choice
# ----------------------------------------------------------------------------------------------

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


@dataclasses.dataclass(frozen=True)
class LabelledSet:
    """Labelled images: the images under test_dir, each normal unless gt_dir holds its defect mask
    (image_utils.find_mask)."""
    test_dir: str
    gt_dir: str

    @classmethod
    def find(cls, test_dir=None, gt_dir=None):
        """The labelled set of --test_dir / --gt_dir (default images/ + gt_masks/, if both exist), or
        None. A directory given explicitly must exist (UsageError). Nothing is listed yet."""
        for explicit in (test_dir, gt_dir):
            if explicit and not os.path.isdir(explicit):
                raise UsageError(f'no such directory: {explicit}')
        test_dir, gt_dir = test_dir or DEFAULT_TEST_DIR, gt_dir or DEFAULT_GT_DIR
        if os.path.isdir(test_dir) and os.path.isdir(gt_dir):
            return cls(test_dir, gt_dir)
        logger.info('no labelled images (%s + %s)', test_dir, gt_dir)
        return None

    @property
    def source(self):
        return f'{self.test_dir} + {self.gt_dir}'

    def mask_of(self, path):
        """The mask file of the image `path`, or None (a normal image)."""
        return image_utils.find_mask(path, self.test_dir, self.gt_dir)

    def listing(self):
        """(image paths, their masks) of the set, listed now (ImageError where there are no images)."""
        paths = image_utils.list_images(self.test_dir)
        return paths, [self.mask_of(p) for p in paths]


def check_request(threshold=None, fpr=None):
    """UsageError where the thresholds asked for contradict each other."""
    if threshold is not None and fpr is not None:
        raise UsageError('--threshold and --fpr both set the image threshold: give one of them')


def choose(detector, threshold=None, fpr=None, labelled=None, recalibrate=False):
    """The command line's policy: set `detector`'s thresholds -> the labelled images' Inspections
    scored to derive them ({realpath: Inspection}, for the caller to store the new thresholds in the
    feature file), or None where no labelled image was scored.

    threshold given: that image threshold; nothing is scored, the pixel threshold comes from the
    training hold-out. fpr given: both from the training hold-out for that false-positive rate
    (labelled images unused). Thresholds stored in the feature file for the same labelled set
    (LabelledSet; same files, sizes, modification times, same rule) are reused and nothing is scored;
    without labelled images stored ones are reused too (hold-out ones are recomputed). Else, or with
    recalibrate, the labelled images are scored for F1-optimal thresholds (the training hold-out when
    they lack a class).
    """
    check_request(threshold, fpr)
    current = detector.thresholds_
    if threshold is not None:
        chosen = manual(current, threshold, '--threshold')
        detector.thresholds_ = from_holdout(detector.holdout_, localizes=detector.localizes, image=chosen)
        return None
    if fpr is not None or labelled is None:
        if fpr is not None and labelled is not None:
            logger.info('--fpr %g: thresholds from the training hold-out, not from %s', fpr, labelled.test_dir)
        if fpr is None and not recalibrate and current.rule != HOLDOUT:
            _reuse(detector, None)  # a decision stored without labelled images to check it against
        else:  # a rule: recomputed
            detector.thresholds_ = from_holdout(detector.holdout_, fpr, detector.localizes)
        return None
    paths, masks = labelled.listing()
    fingerprint = labelled_set_fingerprint(paths, masks, rule=CALIBRATION_RULE)
    if recalibrate:
        logger.info('--recalibrate: deriving the thresholds from %s again', labelled.source)
    elif _reuse(detector, fingerprint):
        return None
    results = [r for r in detector.inspect(paths, masks, desc='threshold: labelled images') if not r.error]
    detector.calibrate_results(results, source=labelled.source, fingerprint=fingerprint)
    return {os.path.realpath(r.path): r for r in results}


def _reuse(detector, fingerprint):
    """Keep the detector's thresholds (as loaded from a feature file) if they were derived for the
    labelled set `fingerprint` -> True, marked stored; else log why not and return False."""
    current = detector.thresholds_
    reason = recalibration_reason(current, fingerprint)
    if reason:
        logger.info('deriving the thresholds from the labelled images: %s', reason)
        return False
    detector.thresholds_ = current = dataclasses.replace(current, stored=True)
    logger.info('image threshold %.3f %s%s', current.image, current.description,
                ' (no labelled images to check it against)' if fingerprint is None
                else ', for this labelled set: labelled images not scored')
    return True
