"""Held-out training scores: what a new normal image would score, from models fitted without each
training image, and the contamination rounds that leave defective training images out.

Rows are training views (an image and its augmented copies share a group); scores are per source
image, in np.unique(groups) order. thresholds.from_holdout turns these scores into thresholds.
"""
import dataclasses

import numpy as np

from anomaly_model import select_features
from thresholds import open_fraction

HOLDOUT_FOLDS = 5
ROBUST_Z_CUT = 3.5
CONTAMINATION_ROUNDS = 3


@dataclasses.dataclass(frozen=True)
class HoldoutScores:
    """image: (n,) held-out scores of the n kept training images; pixel_maxima: (n,) the largest value
    of each one's held-out map, or None (a method without maps, or a feature file from before they were
    kept: then pixel_max, their maximum, alone)."""
    image: np.ndarray
    pixel_maxima: np.ndarray = None
    pixel_max: float = None

    @classmethod
    def from_meta(cls, meta):
        maxima = meta.get('holdout_pixel_maxima')
        return cls(np.asarray(meta['holdout_scores'], np.float64),
                   None if maxima is None else np.asarray(maxima, np.float64), meta['holdout_thresholds']['pixel'])

    def to_meta(self):
        """The feature file's record of them (meta keys holdout_scores, holdout_pixel_maxima, holdout_thresholds)."""
        maxima = None if self.pixel_maxima is None else [float(s) for s in self.pixel_maxima]
        return {'holdout_thresholds': {'image': float(np.max(self.image)),
                                       'pixel': None if maxima is None else float(max(maxima))},
                'holdout_scores': [float(s) for s in self.image], 'holdout_pixel_maxima': maxima}


def check_contamination(contamination):
    """None, 'auto' or a fraction in (0, 0.5) -> itself (a float for a fraction); else UsageError."""
    if contamination is None or contamination == 'auto':
        return contamination
    return open_fraction(contamination, 0.5,
                         f"contamination must be 'auto' or a fraction in (0, 0.5), got {contamination!r}")


def holdout_folds(groups, folds=HOLDOUT_FOLDS, seed=0):
    """(N,) int hold-out fold of each row: source images dealt at random into `folds` folds, and
    each row in its source image's fold. groups: (N,) source image of each row."""
    unique = np.unique(groups)
    fold_of_group = np.random.default_rng(seed).permutation(len(unique)) % min(folds, len(unique))
    return fold_of_group[np.searchsorted(unique, groups)]


def holdout_scores(method, features, groups, output_size, folds=HOLDOUT_FOLDS, seed=0):
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

