"""Scores of 12-bit-in-16-bit copies of the sample images against their 8-bit originals (issue 15).

    python3 benchmarks/bit_depth.py                  # train/ and images/ of the sample data
    python3 benchmarks/bit_depth.py --bits 10 --method padim

A B-bit camera writes 0..2**B-1 into 16-bit files; the copies here are round(x * (2**B-1) / 255) of
each 8-bit image. Scenarios, each scoring the 16 sample test images:
- policy:   a Detector fitted on the B-bit copies of train/ learns bit_depth_ = B and scores the B-bit
            copies of images/; compared with one fitted on the 8-bit train/ scoring the 8-bit images.
- fallback: the 8-bit-trained Detector scores the B-bit copies (each scaled by its own range, warned).
- no policy: the same with bit_depth_ = None (full 16-bit range), what the tool did before.
Prints the maximum relative score difference and the verdicts that change, as one JSON line.
"""
import argparse
import json
import os
import sys
import tempfile

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import image_utils  # noqa: E402
from detector import Detector  # noqa: E402


def deep_copies(paths, folder, bits):
    """B-bit-in-16-bit PNG copies of 8-bit images -> their paths."""
    os.makedirs(folder, exist_ok=True)
    copies = []
    for path in paths:
        image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        deep = np.round(image.astype(np.float64) * ((1 << bits) - 1) / 255).astype(np.uint16)
        copies.append(os.path.join(folder, os.path.basename(path)))
        assert cv2.imwrite(copies[-1], deep)
    return copies


def compare(reference, scores, threshold):
    relative = np.abs(scores - reference) / np.abs(reference)
    flipped = int(((scores >= threshold) != (reference >= threshold)).sum())
    return {'max_relative_difference': float(relative.max()), 'verdicts_changed': flipped,
            'scores': [round(float(s), 3) for s in scores]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--bits', type=int, default=12, choices=image_utils.HIGH_BIT_DEPTHS[:-1])
    p.add_argument('--method', default='mahalanobis')
    p.add_argument('--model_dir', default=os.path.join(ROOT, 'models'))
    args = p.parse_args()
    train, test = (image_utils.list_images(os.path.join(ROOT, name)) for name in ('train', 'images'))
    with tempfile.TemporaryDirectory() as folder:
        deep_train = deep_copies(train, os.path.join(folder, 'train'), args.bits)
        deep_test = deep_copies(test, os.path.join(folder, 'test'), args.bits)
        eight = Detector(method=args.method, model_dir=args.model_dir).fit(train)
        reference = eight.decision_function(test)
        deep = Detector(method=args.method, model_dir=args.model_dir).fit(deep_train)
        result = {'bits': args.bits, 'method': args.method, 'learnt_bit_depth': deep.bit_depth_,
                  'reference_scores': [round(float(s), 3) for s in reference],
                  'threshold': eight.threshold_,
                  'policy': compare(reference, deep.decision_function(deep_test), eight.threshold_),
                  'fallback': compare(reference, eight.decision_function(deep_test), eight.threshold_)}
        eight.bit_depth_ = None
        result['no_policy'] = compare(reference, eight.decision_function(deep_test), eight.threshold_)
    print(json.dumps(result))


if __name__ == '__main__':
    main()
