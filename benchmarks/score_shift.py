"""The score-shift warning (conditions.ScoreShiftWindow) on MVTec AD: do MVTec's test/good images, which
were photographed apart from the training images (docs/accuracy.md, benchmarks/exchangeability.py),
raise it, and do images like the training images stay below it?

    python3 benchmarks/score_shift.py --category bottle --method padim

Each of --rounds seeded splits fits a Detector on --fit_count of train/good with its default threshold
(FPR 0.01) and scores two pools of new normal images: the training images left out of the fit
(exchangeable with the fitted ones by construction) and test/good. Of each pool's images judged normal
(the ones the window counts), the share at or above the held-out median (the window's reference: at
most 1/2 for exchangeable images) and the binomial p-value of that count (what a window of that many
images would say). Then --streams seeded streams of --stream_length images are drawn with replacement
from test/good, a --defect_rate share of them from the test defects (left out when judged ANOMALY, as
LineReport does), through a window of --window images: the share of streams warned and the median
number of images until the warning. (Streams drawn from the 59-70 left-out images would stand for that
pool's own share, which differs from 1/2 by chance; the window's rate on exchangeable scores is checked
exactly in tests/test_line.py.) Prints one line per round and one JSON line.
"""
import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import conditions  # noqa: E402
import image_utils  # noqa: E402
from detector import Detector  # noqa: E402
from thresholds import conformal_threshold  # noqa: E402

MVTEC = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'mvtec')


def first_warnings(rng, scores, defect_scores, reference, threshold, args):
    """Images until the first warning of each stream (None: none within --stream_length)."""
    firsts = []
    for _ in range(args.streams):
        is_defect = rng.random(args.stream_length) < args.defect_rate
        stream = np.where(is_defect, rng.choice(defect_scores, args.stream_length),
                          rng.choice(scores, args.stream_length))
        window = conditions.ScoreShiftWindow(args.window)
        first = None
        for i, score in enumerate(stream):
            if score < threshold and (window.add(score, reference) or {}).get('state') == 'started':
                first = i + 1
                break
        firsts.append(first)
    return firsts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data_path', default=MVTEC)
    p.add_argument('--category', default='bottle')
    p.add_argument('--method', default='padim')
    p.add_argument('--fit_count', type=int, default=150)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--window', type=int, default=conditions.SHIFT_WINDOW)
    p.add_argument('--streams', type=int, default=200)
    p.add_argument('--stream_length', type=int, default=2000)
    p.add_argument('--defect_rate', type=float, default=0.02)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    root = os.path.join(args.data_path, args.category)
    train = image_utils.list_images(os.path.join(root, 'train', 'good'))
    tests = image_utils.list_images(os.path.join(root, 'test'))
    test_good = [t for t in tests if os.path.basename(os.path.dirname(t)) == 'good']
    defects = [t for t in tests if os.path.basename(os.path.dirname(t)) != 'good']
    rng = np.random.default_rng(args.seed)
    rows = []
    for round_ in range(args.rounds):
        order = rng.permutation(len(train))
        detector = Detector(method=args.method, model_dir=os.path.join(ROOT, 'models'), seed=args.seed)
        detector.fit([train[i] for i in order[:args.fit_count]])
        reference, threshold = conformal_threshold(detector.holdout_.image, 0.5)[0], detector.threshold_
        row, scores = {'round': round_}, {}
        for name, pool in (('left_out', [train[i] for i in order[args.fit_count:]]), ('test_good', test_good)):
            scores[name] = detector.decision_function(pool)
            judged_normal = scores[name][scores[name] < threshold]
            above = int(np.sum(judged_normal >= reference))
            row[f'{name}_above_median'] = above / len(judged_normal)
            row[f'{name}_p'] = float(f'{conditions.upper_tail_counts(len(judged_normal))[above] / 2 ** len(judged_normal):.3g}')
        firsts = first_warnings(rng, scores['test_good'], detector.decision_function(defects), reference, threshold,
                                args)
        warned = [f for f in firsts if f is not None]
        row['test_good_streams_warned'] = len(warned) / len(firsts)
        row['test_good_median_images_to_warning'] = float(np.median(warned)) if warned else None
        rows.append(row)
        print(' '.join(f'{k} {v:.3g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()), flush=True)
    print(json.dumps({'category': args.category, 'method': args.method, 'window': args.window,
                      'defect_rate': args.defect_rate, 'streams': args.streams, 'stream_length': args.stream_length,
                      'rounds': rows}))

if __name__ == '__main__':
    main()
