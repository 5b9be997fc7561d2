"""Issue 26's acceptance: teaching a fitted detector more good images (Detector.partial_fit, what
`mahalanobisad.py --add_good` runs) against fitting on all of them, on MVTec metal_nut, one run.

    python3 benchmarks/relearn.py                     # mahalanobis, padim, patchcore
    python3 benchmarks/relearn.py --methods padim --json out.json

Per method:
- exactness: fit on the first half of train/good, add the second half; the test images' scores
  against the full fit's (max relative difference; the Gaussians must agree to 1e-6) and the image
  AUROC of both (PatchCore's may differ by 0.003); the held-out scores of the added images and of the
  earlier ones against the full fit's leave-one-out scores (the Gaussians compute all of them again
  under the updated model; PatchCore keeps the earlier ones, from the smaller bank), and the
  thresholds both give;
- cost: fit on the first 200 images, time adding the last 20 (10%) against a full fit on all 220, in
  the same process (backbone opened beforehand, so both times include reading the images and the
  backbone); each time is the least of --repeats runs (other load on the machine only ever adds to a
  run; it is printed too: run on an idle machine for the acceptance figure).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import image_utils  # noqa: E402
from detector import Detector  # noqa: E402

METAL_NUT = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'mvtec', 'metal_nut')


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def relative(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.maximum(np.abs(b), 1e-12)))


def measure(method, train, test, labels, model_dir, added_share, repeats):
    row = {'method': method}
    fits = [timed(Detector(method=method, model_dir=model_dir).fit, train) for _ in range(repeats)]
    full, row['full_fit_s'] = fits[0][0], min(seconds for _, seconds in fits)
    half = Detector(method=method, model_dir=model_dir).fit(train[:len(train) // 2])
    _, row['add_half_s'] = timed(half.partial_fit, train[len(train) // 2:])
    full_scores, half_scores = full.decision_function(test), half.decision_function(test)
    row['score_max_rel_diff'] = relative(half_scores, full_scores)
    row['auroc_full'], row['auroc_added'] = roc_auc_score(labels, full_scores), roc_auc_score(labels, half_scores)
    kept = len(train) // 2
    row['added_holdout_max_rel_diff'] = relative(half.holdout_.image[kept:], full.holdout_.image[kept:])
    row['earlier_holdout_max_rel_diff'] = relative(half.holdout_.image[:kept], full.holdout_.image[:kept])
    row['threshold_full'], row['threshold_added'] = full.threshold_, half.threshold_
    base_count = int(round(len(train) / (1 + added_share)))
    row['add_10pct_s'] = min(timed(Detector(method=method, model_dir=model_dir).fit(train[:base_count]).partial_fit,
                                   train[base_count:])[1] for _ in range(repeats))
    row['n_added_10pct'] = len(train) - base_count
    row['add_10pct_over_full_fit'] = row['add_10pct_s'] / row['full_fit_s']
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data', default=METAL_NUT, help='an MVTec category folder')
    p.add_argument('--methods', nargs='+', default=['mahalanobis', 'padim', 'patchcore'])
    p.add_argument('--model_dir', default=os.path.join(ROOT, 'models'))
    p.add_argument('--added_share', type=float, default=0.1, help='the cost run adds this share of the base fit')
    p.add_argument('--repeats', type=int, default=3, help='each time is the least of this many runs')
    p.add_argument('--json', default=None)
    args = p.parse_args(argv)
    train = image_utils.list_images(os.path.join(args.data, 'train', 'good'))
    test = image_utils.list_images(os.path.join(args.data, 'test'))
    labels = [os.path.basename(os.path.dirname(path)) != 'good' for path in test]
    Detector(model_dir=args.model_dir).extractor  # converted and opened before any timing
    print(f'{len(train)} training, {len(test)} test images; load average {os.getloadavg()[0]:.1f} on '
          f'{os.cpu_count()} cores', flush=True)
    rows = []
    for method in args.methods:
        rows.append(measure(method, train, test, labels, args.model_dir, args.added_share, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    print(f'{"method":<12} {"score rel":>10} {"AUROC full":>10} {"AUROC add":>10} {"add 10% s":>10} '
          f'{"full fit s":>10} {"ratio":>6}')
    for r in rows:
        print(f'{r["method"]:<12} {r["score_max_rel_diff"]:10.2e} {r["auroc_full"]:10.4f} {r["auroc_added"]:10.4f} '
              f'{r["add_10pct_s"]:10.2f} {r["full_fit_s"]:10.2f} {r["add_10pct_over_full_fit"]:6.3f}')
    print(f'load average after: {os.getloadavg()[0]:.1f}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
