"""Are a category's test/good images exchangeable with its training images? The good-image threshold's
promise (a new normal image is flagged with probability at most ALPHA) assumes they are.

    python3 benchmarks/exchangeability.py --category bottle --method padim --rounds 3

Each round fits on a seeded random --fit_count of train/good, derives the thresholds from that fit's
held-out (leave-one-image-out) scores, and measures the FPR at each --fpr on (a) the training images
left out of the fit, which are exchangeable with the fitted ones by construction, and (b) test/good.
Where (a) keeps the promise and (b) does not, the test/good images differ from the training images
(another session, lighting, resolution), and no rule on training images alone can keep it for them.
Both sets are new to the round's model, so exchangeability can be tested directly: `test_above_p` is
the one-sided Mann-Whitney p-value that test/good scores run above the left-out training images'
(small: test/good is not exchangeable with the training images), and `<measure>_p` the two-sided one
that their imaging conditions (conditions.py: brightness, contrast, sharpness of the network view, and
the feature-level distance) differ. Prints one line per round and one JSON line.
"""
import argparse
import json
import os
import sys

import numpy as np
from scipy.stats import mannwhitneyu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import image_utils  # noqa: E402
from conditions import MEASURES  # noqa: E402
from detector import Detector  # noqa: E402
from thresholds import conformal_threshold  # noqa: E402

MVTEC = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'mvtec')


def inspected(detector, paths):
    """-> image scores (N,) and conditions (N, 4): brightness, contrast, sharpness, feature distance."""
    results = list(detector.inspect(paths, desc=None))
    conditions = [[getattr(r.conditions, m) for m in MEASURES + ('features',)] for r in results]
    return np.array([r.score for r in results]), np.array(conditions, np.float64)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data_path', default=MVTEC)
    p.add_argument('--category', default='bottle')
    p.add_argument('--method', default='padim')
    p.add_argument('--fit_count', type=int, default=150, help='training images each round fits on')
    p.add_argument('--fpr', type=float, nargs='+', default=[0.05, 0.1])
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    root = os.path.join(args.data_path, args.category)
    train = image_utils.list_images(os.path.join(root, 'train', 'good'))
    test_good = image_utils.list_images(os.path.join(root, 'test', 'good'))
    rng = np.random.default_rng(args.seed)
    rows = []
    for round_ in range(args.rounds):
        order = rng.permutation(len(train))
        fitted, left_out = order[:args.fit_count], order[args.fit_count:]
        detector = Detector(method=args.method, model_dir=os.path.join(ROOT, 'models'), seed=args.seed)
        detector.fit([train[i] for i in fitted])
        held_out = detector.holdout_.image
        left_out_scores, left_out_conditions = inspected(detector, [train[i] for i in left_out])
        test_scores, test_conditions = inspected(detector, test_good)
        row = {'round': round_, 'held_out_median': float(np.median(held_out)),
               'left_out_median': float(np.median(left_out_scores)),
               'test_good_median': float(np.median(test_scores)),
               'test_above_p': float(mannwhitneyu(test_scores, left_out_scores, alternative='greater').pvalue)}
        for j, measure in enumerate(MEASURES + ('features',)):
            row[f'{measure}_p'] = float(mannwhitneyu(test_conditions[:, j], left_out_conditions[:, j]).pvalue)
        for alpha in args.fpr:
            threshold = conformal_threshold(held_out, alpha)[0]
            row[f'left_out_fpr@{alpha:g}'] = float(np.mean(left_out_scores >= threshold))
            row[f'test_good_fpr@{alpha:g}'] = float(np.mean(test_scores >= threshold))
        rows.append(row)
        print(' '.join(f'{k} {v:.3f}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()), flush=True)
    summary = {'category': args.category, 'method': args.method, 'fit_count': args.fit_count,
               'left_out': len(train) - args.fit_count, 'test_good': len(test_good), 'rounds': rows}
    for key in rows[0]:
        if '@' in key:
            summary['mean_' + key] = float(np.mean([r[key] for r in rows]))
    print(json.dumps(summary))


if __name__ == '__main__':
    main()
