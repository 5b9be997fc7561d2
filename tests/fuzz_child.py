"""Child process of the fuzz test: reads every case under a folder the way the tool does and prints
a JSON summary. A Python exception other than the tool's own is printed with its traceback and
makes the exit code 1; a crash shows as a signal in the parent.

    python3 -m tests.fuzz_child FOLDER MAX_PIXELS
FOLDER/images/*: decoded as image, view and mask; FOLDER/features/*: loaded as feature files (arrays, then
the Detector's metadata) and, when they load, used to score.
"""
import json
import os
import sys
import traceback

import numpy as np

import errors
import feature_file
import image_utils
from tests import hostile


def peak_rss_mb():
    """This process's peak resident memory (VmHWM), MiB. Not ru_maxrss: after fork and exec that
    includes the parent's resident memory at the fork."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:')) / 1024


def main(folder, max_pixels):
    outcomes = {'accepted': 0, 'refused': 0, 'unexpected': 0}
    maps = [np.random.default_rng(1).standard_normal((2,) + shape).astype(np.float32) for shape in hostile.SHAPES]

    def attempt(action, *args, **kwargs):
        try:
            action(*args, **kwargs)
            outcomes['accepted'] += 1
        except (image_utils.ImageError, errors.FeatureFileError):
            outcomes['refused'] += 1
        except Exception:  # noqa: BLE001 - the point: anything else is a failure, shown in full
            outcomes['unexpected'] += 1
            print(f'--- {args[0]}', file=sys.stderr)
            traceback.print_exc()

    def score(path):
        meta, methods, _ = feature_file.load(path)
        feature_file.check_meta(path, meta)
        for method in methods:
            scores, _ = method.score(method.features(maps), hostile.INPUT_SIZE)
            if not np.isfinite(scores).all():
                raise AssertionError('a loaded feature file gave scores that are not finite')

    images = sorted(os.listdir(os.path.join(folder, 'images')))
    for name in images:
        path = os.path.join(folder, 'images', name)
        attempt(image_utils.load_view, path, 64, 56, bit_depth=12, max_pixels=max_pixels)
        attempt(image_utils.load_image, path, max_pixels=max_pixels)
        attempt(image_utils.load_mask, path, max_pixels=max_pixels)
    features = sorted(os.listdir(os.path.join(folder, 'features')))
    for name in features:
        attempt(score, os.path.join(folder, 'features', name))
    outcomes.update(images=len(images), feature_files=len(features),
                    peak_rss_mb=peak_rss_mb())
    print(json.dumps(outcomes))
    return 1 if outcomes['unexpected'] else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
