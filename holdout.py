"""Held-out training scores: what a new normal image would score, from the model fitted without each
training image (for thresholds), and the contamination rounds that leave defective training images out
(screened on k-fold scores: see screening_scores).

Rows are training views (an image and its augmented copies share a group); scores are per source
image, in np.unique(groups) order. thresholds.from_holdout turns these scores into thresholds.
"""
import dataclasses

import numpy as np

from anomaly_model import first_rows, select_features
from thresholds import open_fraction

ROBUST_Z_CUT = 3.5
CONTAMINATION_ROUNDS = 3
SCREENING_FOLDS = 5


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


def holdout_scores(method, features, groups, output_size):
    """Scores of the training images under the method fitted without them (leave one image out:
    AnomalyMethod.holdout_scores) -> (image scores (n_images,), the largest value of each image's
    held-out map (n_images,) or None for a method without maps), in np.unique(groups) order.

    In-sample scores are biased low; these are what a new normal image would get. `method` is fitted on
    `features`, whose rows come from the images `groups` (N,) (an image's augmented copies share its
    group and are left out with it); each image's plain view is the one scored.
    """
    return method.holdout_scores(features, groups, output_size)


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


def holdout_folds(groups, folds=SCREENING_FOLDS, seed=0):
    """(N,) int fold of each row: source images dealt at random into `folds` folds, each row in its
    source image's fold. groups: (N,) source image of each row."""
    unique = np.unique(groups)
    fold_of_group = np.random.default_rng(seed).permutation(len(unique)) % min(folds, len(unique))
    return fold_of_group[np.searchsorted(unique, groups)]


def screening_scores(method, features, groups, output_size, folds=SCREENING_FOLDS, seed=0):
    """Each training image's score under `method` (configured) fitted without its fold (its fold_models:
    a refit per fold, PatchCore's carved out of one fold-aligned coreset) -> (G,), in np.unique(groups)
    order: what the contamination rounds screen on.

    Not the leave-one-out scores of the thresholds: a training folder's defects come in kinds (every bent
    part looks alike), and a model fitted on all the other images has seen the rest of a defect's kind,
    which masks it. Leaving a fifth of the images out, most of a kind is out of the model scoring it:
    planted metal_nut defects, PaDiM screening, 20 of 22 found with 3 good images left out (k-fold)
    against 20 of 22 with 14 (leave one out; docs/accuracy.md).
    """
    fold = holdout_folds(groups, folds, seed)
    plain = first_rows(groups)
    scores = np.empty(len(plain))
    for k, model in method.fold_models(features, fold):
        held = fold[plain] == k
        scores[held] = model.score(select_features(features, plain[held]), output_size)[0]
    return scores


def holdout_without_outliers(method, features, groups, output_size, contamination=None, seed=0,
                             rounds=CONTAMINATION_ROUNDS):
    """The training images that look defective, left out -> (kept (N,) bool over rows, excluded
    [(group, screening score, round)] in exclusion order).

    Each round scores the images still kept (screening_scores) and drops the outliers; the next round
    refits without them, so defects that the first fits had absorbed stand out. contamination: None
    (drop nothing), 'auto' (`robust_outliers`, until a round finds none; never more than half the images)
    or a fraction in (0, 0.5): that share of the images, the highest scored, dropped over the rounds in
    equal parts. method: configured, unfitted.
    """
    kept, excluded = np.ones(len(groups), bool), []
    if contamination is None:
        return kept, excluded
    n_images = len(np.unique(groups))
    if contamination != 'auto':  # that share, dropped in parts of at least one image
        target = int(np.floor(contamination * n_images + 0.5))
        rounds = min(rounds, target)
    for round_ in range(1, rounds + 1):
        kept_groups = groups[kept]
        scores = screening_scores(method, select_features(features, kept), kept_groups, output_size, seed=seed)
        image_groups = np.unique(kept_groups)
        if contamination == 'auto':
            flagged = np.nonzero(robust_outliers(scores))[0]
            flagged = flagged[np.argsort(-scores[flagged], kind='stable')][:n_images // 2 - len(excluded)]
        else:
            count = int(np.floor(target * round_ / rounds + 0.5)) - len(excluded)
            flagged = np.argsort(-scores, kind='stable')[:count]
        if not len(flagged):
            break
        excluded += [(int(image_groups[i]), float(scores[i]), round_) for i in flagged]
        kept &= ~np.isin(groups, image_groups[flagged])
    return kept, excluded
