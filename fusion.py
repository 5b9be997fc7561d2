"""Several input sizes, one score: each scale's scores put on the footing of its own held-out training
scores, then fused.

A detector fitted at input sizes S_1 < ... < S_k holds one fitted method per size, each scoring the
same image seen at its size (maps at the largest size, O). Raw scores of different sizes are not
comparable (PatchCore's patch distances grow with the input size), so each is standardised by where
the held-out training scores of its own size lie (holdout.HoldoutScores: what a new normal image
scores at that size):

    z_s = (x_s - mean_s) / std_s          mean_s, std_s of the n held-out image scores of size s
    fused image score = max_s z_s

and each map the same way, with the mean and standard deviation of the held-out images' largest map
values of its size:

    fused map = max_s (map_s - pixel_mean_s) / pixel_std_s        (O x O)

The maximum flags an image that any size finds unusual, in units of that size's normal spread: a small
defect that only the larger view resolves, or a large one that the smaller view sees whole. Since
each z_s is an increasing function of x_s, the largest value of a fused map is the fused value of the
scales' largest map values, so the held-out training images' fused scores and map maxima (which
thresholds.from_holdout turns into thresholds, exactly as for one size) are `fuse` of theirs.
docs/accuracy.md compares this with the other rules measured (benchmarks/scale_fusion.py).
"""
import dataclasses

import numpy as np

from holdout import HoldoutScores


@dataclasses.dataclass(frozen=True)
class Footing:
    """Where one scale's held-out scores lie: mean and standard deviation of its held-out image
    scores, and of its held-out images' largest map values (None without maps)."""
    image_mean: float
    image_std: float
    pixel_mean: float = None
    pixel_std: float = None

    @classmethod
    def of(cls, held_out):
        """The footing of one scale's holdout.HoldoutScores."""
        def spread(values):
            values = np.asarray(values, np.float64)
            # A floor keeps identical held-out scores (duplicate training images) from dividing by 0.
            return float(values.mean()), max(float(values.std(ddof=1)), 1e-6 * max(1.0, abs(float(values.mean()))))
        image = spread(held_out.image)
        pixel = (None, None) if held_out.pixel_maxima is None else spread(held_out.pixel_maxima)
        return cls(*image, *pixel)

    def affine(self, kind='image'):
        """(a, b) with a x + b = (x - mean) / std for the scale's image scores or (kind 'pixel') maps."""
        mean, std = getattr(self, f'{kind}_mean'), getattr(self, f'{kind}_std')
        return 1 / std, -mean / std


def fuse(values, footings, kind='image'):
    """max over scales of (values[s] - mean_s) / std_s -> float64 array of values[0]'s shape.

    values: per scale, an array of scores (N,) (kind 'image') or maps (N, O, O) (kind 'pixel'), all of
    one shape; footings: per scale, its Footing (export_onnx builds the same from Footing.affine)."""
    fused = None
    for value, footing in zip(values, footings):
        a, b = footing.affine(kind)
        standardised = np.asarray(value, np.float64) * a + b
        fused = standardised if fused is None else np.maximum(fused, standardised, out=fused)
    return fused


def fuse_holdout(scale_holdout, footings):
    """The held-out scores of the fused detector, from each scale's (holdout.HoldoutScores, image for
    image) -> HoldoutScores."""
    maxima = None if scale_holdout[0].pixel_maxima is None else \
        fuse([h.pixel_maxima for h in scale_holdout], footings, 'pixel')
    return HoldoutScores(fuse([h.image for h in scale_holdout], footings), maxima)
