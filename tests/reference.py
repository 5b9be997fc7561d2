"""Where the committed torch reference lives and which values of each output it holds."""
import numpy as np

REFERENCE_IMAGE = 'images/broken_large_000.png'
REFERENCE_FILE = 'tests/data/efficientnet_lite_reference.npz'
REFERENCE_POINTS = 160


def reference_positions(size):
    """Flat positions sampled from an output: evenly spaced, both ends included (so borders,
    where 'same' padding matters, and every part of the tensor are covered)."""
    return np.linspace(0, size - 1, REFERENCE_POINTS).round().astype(np.int64)
