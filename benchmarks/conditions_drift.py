"""Imaging conditions on MVTec AD metal_nut (issue 25's acceptance), and what the feature-level check
adds to the photometric one:

    python3 benchmarks/conditions_drift.py                        # ../shared/data/mvtec/metal_nut
    python3 benchmarks/conditions_drift.py --category bottle --blur 1 1.5 2

A Detector (lite0, PaDiM, its defaults, seed 0) is fitted on train/good; its conditions ranges
(conditions.py: conformal at DRIFT_RATE, widened by RANGE_MARGIN) come with the fit; its threshold is
the hold-out one for FPR 0.01. Then every test image is scored as it is and as copies changed the way a
line changes: darkened (x0.6), blurred (Gaussian, sigma in px of the original image), and three changes
that leave brightness, contrast and sharpness about as they were: the camera shifted (10% of the width),
zoomed in (x1.2) and a colour cast (red x1.2, blue x0.8). For each set: the share of images outside a
photometric range (brightness, contrast or sharpness), outside the feature check's, flagged `drift`
(either), and called ANOMALY. Prints a table and one JSON line.
"""
import argparse
import json
import os
import sys

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import conditions  # noqa: E402
import image_utils  # noqa: E402
from detector import Detector  # noqa: E402

MVTEC = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'mvtec')
FPR = 0.01


def changed(image, change, value=None):
    """An RGB uint8 image as the line might change it."""
    h, w = image.shape[:2]
    if change == 'dark':
        return np.clip(np.round(image * value), 0, 255).astype(np.uint8)
    if change == 'blur':
        return cv2.GaussianBlur(image, (0, 0), value)
    if change == 'shift':
        return cv2.warpAffine(image, np.float32([[1, 0, 0.1 * w], [0, 1, 0]]), (w, h), borderMode=cv2.BORDER_REPLICATE)
    if change == 'zoom':
        return cv2.warpAffine(image, cv2.getRotationMatrix2D((w / 2, h / 2), 0, 1.2), (w, h),
                              borderMode=cv2.BORDER_REPLICATE)
    if change == 'colour':
        return np.clip(np.round(image * np.array([1.2, 1.0, 0.8])), 0, 255).astype(np.uint8)
    return image


def shares(detector, images):
    """{photometric, features, drift, anomaly}: shares of `images` (RGB arrays) flagged by each."""
    judged = list(detector.inspect(images, desc=None))
    outside = [r.conditions.outside for r in judged]
    return {'photometric': float(np.mean([any(o != 'features high' for o in out) for out in outside])),
            'features': float(np.mean(['features high' in out for out in outside])),
            'drift': float(np.mean([r.conditions.drift for r in judged])),
            'anomaly': float(np.mean([r.anomaly for r in judged]))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data_path', default=MVTEC)
    p.add_argument('--category', default='metal_nut')
    p.add_argument('--dark', type=float, default=0.6)
    p.add_argument('--blur', type=float, nargs='+', default=[2.0])
    p.add_argument('--model_dir', default='models')
    args = p.parse_args()
    root = os.path.join(args.data_path, args.category)
    train = image_utils.list_images(os.path.join(root, 'train', 'good'))
    good = image_utils.list_images(os.path.join(root, 'test', 'good'))
    defects = [path for path in image_utils.list_images(os.path.join(root, 'test')) if path not in good]
    detector = Detector(method='padim', model_dir=args.model_dir).fit(train, source=root)
    detector.use_holdout_thresholds(fpr=FPR, log=False)
    condition_range = detector.conditions_
    print(f'{args.category}: {len(train)} training images; lite0 (224 x 224 views), PaDiM, hold-out threshold for FPR '
          f'{FPR}; ranges {dict(zip(conditions.MEASURES, zip(np.round(condition_range.low, 3), np.round(condition_range.high, 3))))}'
          f', feature threshold {condition_range.features.threshold:.2f} (rate {condition_range.rate}, margin '
          f'{condition_range.margin})')

    rgb = {path: cv2.imread(path)[..., ::-1].copy() for path in good + defects}
    sets = {'test/good': [rgb[p] for p in good], 'test defects': [rgb[p] for p in defects]}
    every = list(rgb.values())
    sets[f'dark x{args.dark:g} (all test)'] = [changed(i, 'dark', args.dark) for i in every]
    for sigma in args.blur:
        sets[f'blur sigma {sigma:g} px (all test)'] = [changed(i, 'blur', sigma) for i in every]
    for change, label in (('shift', 'shifted 10% (test/good)'), ('zoom', 'zoomed x1.2 (test/good)'),
                          ('colour', 'colour cast (test/good)')):
        sets[label] = [changed(rgb[p], change) for p in good]
    results = {}
    print(f'{"set":<32} {"images":>6} {"photometric":>12} {"features":>9} {"drift":>7} {"ANOMALY":>8}')
    for label, images in sets.items():
        results[label] = dict(shares(detector, images), n=len(images))
        r = results[label]
        print(f'{label:<32} {r["n"]:>6} {r["photometric"]:>12.1%} {r["features"]:>9.1%} {r["drift"]:>7.1%} '
              f'{r["anomaly"]:>8.1%}')
    ranges = dict(condition_range.to_meta(), features={'threshold': condition_range.features.threshold})
    print(json.dumps({'category': args.category, 'n_train': len(train), 'ranges': ranges, 'results': results}))


if __name__ == '__main__':
    main()
