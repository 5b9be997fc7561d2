"""What the leave-one-image-out hold-out costs: fit seconds of this checkout against another one (the
k-fold hold-out before it), per method, in one run on the same machine.

    git worktree add --detach /tmp/before <commit before the change>
    python3 benchmarks/holdout_cost.py --baseline_repo /tmp/before --rounds 2

Each fit is `Detector(method=...).fit(bottle train/good)` in a fresh process (imports and the opened
backbone excluded from the time), alternating baseline and this checkout, the median of --rounds per
method; with --contamination auto as well where asked. Prints a table and one JSON line.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOTTLE = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'mvtec', 'bottle', 'train', 'good')
METHODS = ('mahalanobis', 'padim', 'spade', 'patchcore')

_CHILD = ('import sys, time, json; sys.path.insert(0, sys.argv[1]); import image_utils; '
          'from detector import Detector; '
          'detector = Detector(method=sys.argv[2], model_dir=sys.argv[4], '
          'contamination=None if sys.argv[5] == "none" else sys.argv[5]); detector.spec; '
          't = time.perf_counter(); detector.fit(image_utils.list_images(sys.argv[3])); '
          'print(json.dumps(time.perf_counter() - t))')


def fit_seconds(repo, method, train_dir, model_dir, contamination):
    out = subprocess.run([sys.executable, '-c', _CHILD, repo, method, train_dir, model_dir, contamination],
                         capture_output=True, text=True, check=True, cwd=repo).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--baseline_repo', required=True, help='a checkout of the version to compare with')
    p.add_argument('--train_dir', default=BOTTLE)
    p.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS)
    p.add_argument('--contamination', nargs='+', default=['none'], help="'none' and/or 'auto' (or a fraction)")
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--model_dir', default=os.path.join(ROOT, 'models'))
    args = p.parse_args(argv)
    rows = []
    for contamination in args.contamination:
        for method in args.methods:
            times = {'baseline': [], 'this': []}
            for _ in range(args.rounds):
                for name, repo in (('baseline', os.path.abspath(args.baseline_repo)), ('this', ROOT)):
                    times[name].append(fit_seconds(repo, method, args.train_dir, args.model_dir, contamination))
            baseline, this = statistics.median(times['baseline']), statistics.median(times['this'])
            rows.append({'method': method, 'contamination': contamination, 'baseline_fit_s': round(baseline, 2),
                         'fit_s': round(this, 2), 'ratio': round(this / baseline, 3)})
            print(f"{method:<12} {contamination:<6} baseline {baseline:7.2f} s   this {this:7.2f} s   "
                  f"ratio {this / baseline:.3f}", flush=True)
    print(json.dumps(rows))
    return rows


if __name__ == '__main__':
    main()
