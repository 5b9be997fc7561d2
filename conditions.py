"""Imaging conditions: is this image lit, contrasted and focused as the training images were?

A detector fitted under one light and one focus raises ANOMALY on every part (or on none) once the
light or the focus changes. Each image gets three measures of its network view (the pixels the
backbone sees, so a camera's resolution does not change them), on its luma Y (BT.601, 0..255):

- brightness: the mean of Y;
- contrast: the standard deviation of Y (RMS contrast);
- sharpness: the standard deviation of the 3 x 3 Laplacian of Y divided by the contrast: edge energy
  relative to the image's spread, so a darker image (Y scaled) keeps its sharpness and a blurred one
  loses it whatever its light.

`ConditionRange.fit` takes the training images' measures; an image is `drift` when any measure falls
outside its range. The range is the hold-out rule of the thresholds (thresholds.conformal_threshold):
for a stated rate (DRIFT_RATE), each side is the order statistic a new normal image passes with
probability at most rate / 2; no model is fitted on these measures, so the training images' own values
are exchangeable with a new normal image's and need no folds. The range is then widened by
RANGE_MARGIN of its width on each side, so that `drift` marks a change beyond the training variation
rather than the edge of a small sample. `DriftWindow` turns per-image flags into one warning when most
of the recent images drift and one when that ends.
"""
import collections
import dataclasses

import cv2
import numpy as np

from thresholds import conformal_threshold

MEASURES = ('brightness', 'contrast', 'sharpness')
DRIFT_RATE = 0.01     # a normal image leaves one measure's range with probability at most this (see fit)
RANGE_MARGIN = 0.1    # the conformal range widened by this share of its width on each side
DRIFT_WINDOW = 20     # recent images the drift warning looks at
WINDOW_START = 0.5    # a warning when more than this share of the window drifts ...
WINDOW_END = 0.25     # ... and its end when at most this share does (between them, no flapping)


def measure(view):
    """An RGB uint8 view (S, S, 3) -> (3,) float64: brightness, contrast, sharpness (see the module)."""
    luma = cv2.cvtColor(view, cv2.COLOR_RGB2GRAY).astype(np.float32)
    contrast = float(luma.std())
    laplacian = cv2.Laplacian(luma, cv2.CV_32F, ksize=3)
    # Contrast below one grey level: a flat image, whose sharpness is its edge energy as it is.
    return np.array([luma.mean(), contrast, laplacian.std() / max(contrast, 1.0)], np.float64)


@dataclasses.dataclass(frozen=True)
class Conditions:
    """One image's measures (brightness, contrast, sharpness; see the module), whether they are
    outside the training range (`drift`; None without a range: a feature file from before it was
    kept) and which are (`outside`: names with ' low' or ' high')."""
    brightness: float
    contrast: float
    sharpness: float
    drift: bool = None
    outside: tuple = ()

    def to_json(self):
        return {'brightness': round(self.brightness, 2), 'contrast': round(self.contrast, 2),
                'sharpness': round(self.sharpness, 4), 'drift': self.drift, 'outside': list(self.outside)}


@dataclasses.dataclass(frozen=True)
class ConditionRange:
    """The training images' range of each measure: low (3,), high (3,) in MEASURES order; rate: the
    probability bound of one side pair (see fit); margin: the widening; n: training images."""
    low: tuple
    high: tuple
    rate: float = DRIFT_RATE
    margin: float = RANGE_MARGIN
    n: int = None

    @classmethod
    def fit(cls, values, rate=DRIFT_RATE, margin=RANGE_MARGIN):
        """values: (n, 3) measures of the n training images -> their range.

        Each side is the conformal order statistic at rate / 2 (the upper one on the values, the lower
        one on their negatives): a new normal image falls outside a measure's unwidened range with
        probability at most `rate` when n >= 2 / rate - 1 (199 images for 0.01), else at most 2 / (n + 1)
        (the range is then the training minimum and maximum). The margin only narrows that probability.
        """
        values = np.asarray(values, np.float64).reshape(-1, len(MEASURES))
        high = np.array([conformal_threshold(column, rate / 2)[0] for column in values.T])
        low = -np.array([conformal_threshold(-column, rate / 2)[0] for column in values.T])
        width = high - low
        return cls(tuple((low - margin * width).tolist()), tuple((high + margin * width).tolist()), rate, margin,
                   len(values))

    def check(self, values):
        """(3,) measures of one image -> its Conditions."""
        outside = tuple(f'{name} {"low" if value < low else "high"}'
                        for name, value, low, high in zip(MEASURES, values, self.low, self.high)
                        if not low <= value <= high)
        return Conditions(*map(float, values), drift=bool(outside), outside=outside)

    def to_meta(self):
        """The feature file's record (meta key 'conditions')."""
        return {'measures': list(MEASURES), 'low': list(self.low), 'high': list(self.high), 'rate': self.rate,
                'margin': self.margin, 'n': self.n}

    @classmethod
    def from_meta(cls, stored):
        """The range a feature file keeps, or None (a file from before ranges were kept)."""
        if stored is None:
            return None
        return cls(tuple(stored['low']), tuple(stored['high']), stored['rate'], stored['margin'], stored['n'])


def meta_problem(stored):
    """What is wrong with a feature file's 'conditions' entry, or None if it is usable (or absent)."""
    if stored is None:
        return None
    if not isinstance(stored, dict) or stored.get('measures') != list(MEASURES):
        return f'conditions {str(stored)[:100]} do not list the measures {", ".join(MEASURES)}'
    bounds = [stored.get('low'), stored.get('high')]
    if not all(isinstance(b, list) and len(b) == len(MEASURES) and all(_finite(v) for v in b) for b in bounds) \
            or any(lo > hi for lo, hi in zip(*bounds)):
        return 'conditions low / high are not finite ranges'
    if not all(_finite(stored.get(k)) for k in ('rate', 'margin')) or not isinstance(stored.get('n'), int):
        return 'conditions rate / margin / n are not numbers'
    return None


def _finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def judge(values, condition_range):
    """(3,) measures -> Conditions, against `condition_range` (None: measured, not judged)."""
    if condition_range is None:
        return Conditions(*map(float, values))
    return condition_range.check(values)


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
