"""What each input size costs: fit seconds, images/s and feature-file MB, settings interleaved.

    python3 benchmarks/input_size_cost.py --category ../shared/data/mvtec/metal_nut

On a shared machine the load changes from minute to minute, so one evaluate.py run per setting
(benchmarks/input_sizes.py) compares seconds taken under different loads. Here every setting
(--settings, default "224", "384" and "224 384") is fitted on the same --train training images and
scores the same --test test images (both spread evenly over the category's lists), the settings taking
turns for --rounds rounds; each setting's best round counts (the least disturbed). PatchCore, lite0,
default options, the Detector API as every front end uses it; scoring includes decoding. Prints one
JSON line per setting and a Markdown table with each cost as a ratio to the first setting's.
"""
import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import image_utils  # noqa: E402
from detector import Detector  # noqa: E402


def spread(paths, count):
    """`count` paths spread evenly over `paths` (all of them when there are fewer)."""
    step = max(1, len(paths) / count)
    return [paths[int(i * step)] for i in range(min(count, len(paths)))]


def measure(sizes, train, test, args, folder):
    started = time.perf_counter()
    detector = Detector(method=args.method, model_dir=args.model_dir, input_size=sizes).fit(train)
    fit_s = time.perf_counter() - started
    path = os.path.join(folder, 'cost.pkl')
    detector.save(path)
    started = time.perf_counter()
    detector.decision_function(test)
    return fit_s, len(test) / (time.perf_counter() - started), os.path.getsize(path) / 2 ** 20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--category', required=True, help='an MVTec-layout category folder')
    p.add_argument('--settings', nargs='+', default=['224', '384', '224 384'], help='quoted lists of sizes')
    p.add_argument('--method', default='patchcore')
    p.add_argument('--train', type=int, default=60, help='training images')
    p.add_argument('--test', type=int, default=60, help='test images scored')
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--model_dir', default=os.path.join(ROOT, 'models'))
    args = p.parse_args(argv)
    train = spread(image_utils.list_images(os.path.join(args.category, 'train', 'good')), args.train)
    test = spread(image_utils.list_images(os.path.join(args.category, 'test')), args.test)
    best = {}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.rounds):
            for setting in args.settings:
                fit_s, rate, mb = measure([int(s) for s in setting.split()], train, test, args, folder)
                old = best.get(setting, (float('inf'), 0.0, mb))
                best[setting] = (min(old[0], fit_s), max(old[1], rate), mb)
    base = best[args.settings[0]]
    print(f'\n{os.path.basename(os.path.normpath(args.category))}: {len(train)} training images, '
          f'{len(test)} test images, best of {args.rounds} rounds')
    print('| input size | fit s | images/s | feature file MB |')
    print('|---|---|---|---|')
    for setting in args.settings:
        fit_s, rate, mb = best[setting]
        print(json.dumps({'input_size': setting, 'fit_s': fit_s, 'images_per_s': rate, 'feature_mb': mb}),
              file=sys.stderr)
        print(f'| {setting} | {fit_s:.1f} ({fit_s / base[0]:.2f}x) | {rate:.1f} ({rate / base[1]:.2f}x) | '
              f'{mb:.1f} ({mb / base[2]:.2f}x) |')


if __name__ == '__main__':
    main()
