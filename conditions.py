"""Imaging conditions: is this image lit, focused and framed as the training images were?

A detector fitted under one light, one focus and one camera position raises ANOMALY on every part (or
on none) once they change. Each image gets three photometric measures of its network view (the pixels
the backbone sees, so a camera's resolution does not change them), on its luma Y (BT.601, 0..255):

- brightness: the mean of Y;
- contrast: the standard deviation of Y (RMS contrast);
- sharpness: the standard deviation of the 3 x 3 Laplacian of Y divided by the contrast: edge energy
  relative to the image's spread, so a darker image (Y scaled) keeps its sharpness and a blurred one
  loses it whatever its light;

and one feature-level measure, for what they are blind to (the camera shifted or zoomed, a colour
cast: measured by benchmarks/conditions_drift.py, docs/line_integration.md):

- features: the distance of the backbone's stride-16 feature maps, globally pooled, to the training
  images' (a Ledoit-Wolf Gaussian per map, distances summed: anomaly_model.MahalanobisAD on those maps),
  divided by its threshold (above 1: outside).

`ConditionRange.fit` takes the training images' measures; an image is `drift` when any measure falls
outside its range. The ranges follow the hold-out rule of the thresholds (thresholds.conformal_threshold)
for a stated rate (DRIFT_RATE): each photometric side is the order statistic a new normal image passes
with probability at most rate / 2 (no model is fitted on these measures, so the training images' own
values are exchangeable with a new normal image's and need no folds); the feature threshold is the
conformal one of the held-out distances (5 folds, as holdout.py) at rate. Each range is then widened by
RANGE_MARGIN (of its width; of the feature threshold), so that `drift` marks a change beyond the
training variation rather than the edge of a small sample. `DriftWindow` turns per-image flags into one
warning when most of the recent images drift and one when that ends.
"""
import base64
import collections
import dataclasses
import math

import cv2
import numpy as np

from anomaly_model import MahalanobisAD
from feature_maps import pool_features
from holdout import holdout_folds
from thresholds import conformal_threshold

MEASURES = ('brightness', 'contrast', 'sharpness')
DRIFT_RATE = 0.01     # a normal image leaves one measure's range with probability at most this (see fit)
RANGE_MARGIN = 0.1    # the conformal range widened by this share of its width on each side
DRIFT_WINDOW = 20     # recent images the drift warning looks at
WINDOW_START = 0.5    # a warning when more than this share of the window drifts ...
WINDOW_END = 0.25     # ... and its end when at most this share does (between them, no flapping)
SHIFT_WINDOW = 100    # recent images the score-shift warning looks at (ScoreShiftWindow)
SHIFT_RATE = 0.001    # a window of normal images raises it with probability at most this
MAX_SHIFT_WINDOW = 10000  # a longer window would react only after as many images
FEATURE_STRIDE = 16   # the maps of the feature check: mid-level, where framing and colour show (see the module)
MAX_FEATURE_VALUES = 1 << 17  # the check's Gaussians at most this many numbers (512 KiB in the meta), else left out


def measure(view):
    """An RGB uint8 view (S, S, 3) -> (3,) float64: brightness, contrast, sharpness (see the module)."""
    luma = cv2.cvtColor(view, cv2.COLOR_RGB2GRAY).astype(np.float32)
    contrast = float(luma.std())
    laplacian = cv2.Laplacian(luma, cv2.CV_32F, ksize=3)
    # Contrast below one grey level: a flat image, whose sharpness is its edge energy as it is.
    return np.array([luma.mean(), contrast, laplacian.std() / max(contrast, 1.0)], np.float64)


def stride_maps(feature_maps, input_size):
    """The backbone's feature maps of stride FEATURE_STRIDE, globally pooled -> [(N, C), ...] (those only)."""
    side = round(input_size / FEATURE_STRIDE)
    return pool_features([m for m in feature_maps if m.ndim == 4 and m.shape[-2:] == (side, side)])


@dataclasses.dataclass(frozen=True)
class Conditions:
    """One image's measures (brightness, contrast, sharpness, features; see the module), whether they
    are outside the training range (`drift`; None without a range: a feature file from before it was
    kept) and which are (`outside`: names with ' low' or ' high'). features is None where the fit
    kept no feature check."""
    brightness: float
    contrast: float
    sharpness: float
    features: float = None
    drift: bool = None
    outside: tuple = ()

    def to_json(self):
        return {'brightness': round(self.brightness, 2), 'contrast': round(self.contrast, 2),
                'sharpness': round(self.sharpness, 4),
                'features': None if self.features is None else round(self.features, 4), 'drift': self.drift,
                'outside': list(self.outside)}


def _array_text(array):
    return base64.b64encode(np.ascontiguousarray(array, np.float32).tobytes()).decode('ascii')


def _text_array(text, shape):
    """Base64 text of float32 values -> an array of `shape`; ValueError unless it is exactly that, finite."""
    values = np.frombuffer(base64.b64decode(text.encode('ascii'), validate=True), np.float32)
    if values.size != int(np.prod(shape)) or not np.isfinite(values).all():
        raise ValueError(f'not {shape} finite values')
    return values.reshape(shape).copy()


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureCheck:
    """The feature-level measure: Gaussians (anomaly_model.MahalanobisAD) over the pooled stride-16
    maps of the training images; `threshold` (the held-out conformal one, widened by the margin)
    makes a distance a ratio (above 1: outside)."""
    gaussians: MahalanobisAD
    threshold: float

    @classmethod
    def fit(cls, pooled, rate=DRIFT_RATE, margin=RANGE_MARGIN, seed=0):
        """pooled: [(n, C), ...] stride_maps of the n training images -> the check, or None where the
        backbone has no stride-16 maps or their Gaussians would be larger than MAX_FEATURE_VALUES."""
        if not pooled or sum(p.shape[1] ** 2 + p.shape[1] for p in pooled) > MAX_FEATURE_VALUES:
            return None
        n = len(pooled[0])
        folds, held_out = holdout_folds(np.arange(n), seed=seed), np.empty(n)
        for k in np.unique(folds):
            gaussians = MahalanobisAD().fit([p[folds != k] for p in pooled])
            held_out[folds == k] = gaussians.score([p[folds == k] for p in pooled])
        return cls(MahalanobisAD().fit(pooled), conformal_threshold(held_out, rate)[0] * (1 + margin))

    def ratios(self, feature_maps, input_size):
        """The backbone's maps of N images -> (N,) distance / threshold."""
        return self.gaussians.score(stride_maps(feature_maps, input_size)) / self.threshold

    def to_meta(self):
        return {'threshold': self.threshold, 'channels': [len(m) for m in self.gaussians.means_],
                'means': [_array_text(m) for m in self.gaussians.means_],
                'precisions': [_array_text(p) for p in self.gaussians.precisions_]}

    @classmethod
    def from_meta(cls, stored):
        """The check a feature file keeps (ValueError / TypeError / KeyError if it is not one), or None."""
        if stored is None:
            return None
        channels = stored['channels']
        if not (isinstance(channels, list) and all(isinstance(c, int) and c > 0 for c in channels)) \
                or sum(c * c + c for c in channels) > MAX_FEATURE_VALUES:
            raise ValueError('channels are not a short list of counts')
        if not (_finite(stored['threshold']) and stored['threshold'] > 0):
            raise ValueError('threshold is not a positive number')
        means = [_text_array(t, (c,)) for t, c in zip(stored['means'], channels, strict=True)]
        precisions = [_text_array(t, (c, c)) for t, c in zip(stored['precisions'], channels, strict=True)]
        return cls(MahalanobisAD(means, precisions), float(stored['threshold']))


@dataclasses.dataclass(frozen=True)
class ConditionRange:
    """The training images' range of each photometric measure: low (3,), high (3,) in MEASURES order;
    features: the FeatureCheck (None: none kept); rate: the probability bound of a measure (see fit);
    margin: the widening; n: training images."""
    low: tuple
    high: tuple
    features: FeatureCheck = None
    rate: float = DRIFT_RATE
    margin: float = RANGE_MARGIN
    n: int = None

    @classmethod
    def fit(cls, values, pooled=None, rate=DRIFT_RATE, margin=RANGE_MARGIN, seed=0):
        """values: (n, 3) measures of the n training images; pooled: their stride_maps -> the ranges.

        Each photometric side is the conformal order statistic at rate / 2 (the upper one on the values,
        the lower one on their negatives): a new normal image falls outside a measure's unwidened range
        with probability at most `rate` when n >= 2 / rate - 1 (199 images for 0.01), else at most
        2 / (n + 1) (the range is then the training minimum and maximum); likewise beyond the feature
        threshold (FeatureCheck.fit, seeded folds). The margin only narrows those probabilities.
        """
        values = np.asarray(values, np.float64).reshape(-1, len(MEASURES))
        high = np.array([conformal_threshold(column, rate / 2)[0] for column in values.T])
        low = -np.array([conformal_threshold(-column, rate / 2)[0] for column in values.T])
        width = high - low
        return cls(tuple((low - margin * width).tolist()), tuple((high + margin * width).tolist()),
                   FeatureCheck.fit(pooled, rate, margin, seed), rate, margin, len(values))

    def feature_ratios(self, feature_maps, input_size):
        """(N,) FeatureCheck ratios of N images' backbone maps, or None without a feature check."""
        return None if self.features is None else self.features.ratios(feature_maps, input_size)

    def check(self, values, feature_ratio=None):
        """(3,) measures (and the feature ratio, if any) of one image -> its Conditions."""
        outside = tuple(f'{name} {"low" if value < low else "high"}'
                        for name, value, low, high in zip(MEASURES, values, self.low, self.high)
                        if not low <= value <= high)
        if feature_ratio is not None and feature_ratio > 1:
            outside += ('features high',)
        return Conditions(*map(float, values), None if feature_ratio is None else float(feature_ratio),
                          drift=bool(outside), outside=outside)

    def to_meta(self):
        """The feature file's record (meta key 'conditions')."""
        return {'measures': list(MEASURES), 'low': list(self.low), 'high': list(self.high), 'rate': self.rate,
                'margin': self.margin, 'n': self.n, 'features': self.features and self.features.to_meta()}

    @classmethod
    def from_meta(cls, stored):
        """The ranges a feature file keeps, or None (a file from before they were kept). ValueError,
        TypeError or KeyError where `stored` is not such a record (see meta_problem)."""
        if stored is None:
            return None
        if not isinstance(stored, dict) or stored.get('measures') != list(MEASURES):
            raise ValueError(f'they do not list the measures {", ".join(MEASURES)}')
        bounds = [stored.get('low'), stored.get('high')]
        if not all(isinstance(b, list) and len(b) == len(MEASURES) and all(_finite(v) for v in b) for b in bounds) \
                or any(lo > hi for lo, hi in zip(*bounds)):
            raise ValueError('low / high are not finite ranges')
        if not all(_finite(stored.get(k)) for k in ('rate', 'margin')) or not isinstance(stored.get('n'), int):
            raise ValueError('rate / margin / n are not numbers')
        return cls(tuple(stored['low']), tuple(stored['high']), FeatureCheck.from_meta(stored.get('features')),
                   stored['rate'], stored['margin'], stored['n'])


def meta_problem(stored):
    """What is wrong with a feature file's 'conditions' entry, or None if it is usable (or absent)."""
    try:
        ConditionRange.from_meta(stored)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        return f'conditions unusable: {str(e)[:200] or type(e).__name__}'
    return None


def _finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def judge(values, condition_range, feature_ratio=None):
    """(3,) measures (and the feature ratio) -> Conditions, against `condition_range` (None: measured,
    not judged)."""
    if condition_range is None:
        return Conditions(*map(float, values))
    return condition_range.check(values, feature_ratio)


class DriftWindow:
    """The last `size` images' drift flags -> one warning when more than WINDOW_START of them drift,
    and one when at most WINDOW_END do again. `add` returns the event of that image, or None:
    {'state': 'started' | 'ended', 'window', 'drifted', 'outside': {'brightness low': count, ...}}."""

    def __init__(self, size=DRIFT_WINDOW):
        if size < 1:
            raise ValueError(f'drift window must be at least 1 image, got {size}')
        self.size, self.active = size, False
        self.recent = collections.deque(maxlen=size)

    def add(self, conditions):
        if conditions.drift is None:  # nothing to judge against
            return None
        self.recent.append(conditions.outside)
        drifted = sum(bool(outside) for outside in self.recent)
        if not self.active and len(self.recent) == self.size and drifted > WINDOW_START * self.size:
            self.active = True
        elif self.active and drifted <= WINDOW_END * self.size:
            self.active = False
        else:
            return None
        counts = collections.Counter(name for outside in self.recent for name in outside)
        return {'state': 'started' if self.active else 'ended', 'window': self.size, 'drifted': drifted,
                'outside': dict(counts.most_common())}


class ScoreShiftWindow:
    """Do the recent images score as the training images did? The thresholds from good images keep their
    false-positive rate only for images exchangeable with the training images; a new session, another
    batch of material or a lamp that aged can move every normal score up while each image stays inside
    the photometric ranges (docs/accuracy.md: MVTec's test/good images against their training images).

    The window holds the images judged normal (LineReport leaves ANOMALY verdicts out: a defect does not
    count). Each is compared with the median of the training images' held-out scores (`reference`, the
    conformal threshold at rate 1/2): a normal image exchangeable with them scores at or above it with
    probability at most 1/2, also given that it scored below the threshold (the threshold is above the
    median). A missed defect counts once at most, so a few of them do not raise the warning; most
    images scoring high does. `add` returns a warning when the count among the last `size` images is one
    that exchangeable normal images reach with probability at most `rate` (binomial, exact), and its end
    when the count is back within one standard deviation above half the window; otherwise None. An
    event: {'state': 'started' | 'ended', 'window', 'above_median', 'p'} (p: the chance of a count this
    high from exchangeable normal images).
    """

    def __init__(self, size=SHIFT_WINDOW, rate=SHIFT_RATE):
        if not 1 <= size <= MAX_SHIFT_WINDOW:
            raise ValueError(f'a score-shift window must hold 1 to {MAX_SHIFT_WINDOW} images, got {size}')
        self.size, self.active = size, False
        self.tails = upper_tail_counts(size)
        # The smallest count exchangeable images reach with probability at most `rate` (None: not even all).
        self.start = next((k for k in range(size + 1) if self.tails[k] / 2 ** size <= rate), None)
        if self.start is None:
            raise ValueError(f'a score-shift window of {size} images cannot tell a shift at rate {rate:g}: '
                             f'it needs at least {math.ceil(math.log2(1 / rate))} images')
        self.end = math.floor(size / 2 + math.sqrt(size) / 2)
        self.recent = collections.deque(maxlen=size)
        self.above = 0  # how many of `recent` are True

    def add(self, score, reference):
        """One image's score and the reference (the held-out median) -> an event or None."""
        if len(self.recent) == self.size:
            self.above -= self.recent[0]
        self.recent.append(score >= reference)
        self.above += self.recent[-1]
        above = self.above
        if not self.active and len(self.recent) == self.size and above >= self.start:
            self.active = True
        elif self.active and above <= self.end:
            self.active = False
        else:
            return None
        return {'state': 'started' if self.active else 'ended', 'window': self.size, 'above_median': above,
                'p': float(f'{self.tails[above] / 2 ** self.size:.3g}')}


def upper_tail_counts(n):
    """[sum of C(n, j) for j >= k, for k = 0 .. n]: divided by 2 ** n, P(X >= k) for X ~ Binomial(n, 1/2),
    how likely k of n images exchangeable with the training images score at or above their held-out
    median, at most. Exact integers, each binomial coefficient from the previous one (linear in n;
    scipy.stats would cost start-up time for one sum)."""
    counts, term, total = [0] * (n + 1), 1, 0
    for j in range(n, -1, -1):  # term = C(n, j)
        total += term
        counts[j] = total
        term = term * j // (n - j + 1)
    return counts
