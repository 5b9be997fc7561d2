"""Accuracy and cost per input size: evaluate.py at each setting, in one run, for the table of docs/.

    python3 benchmarks/make_small_parts.py --out /tmp/small_parts
    python3 benchmarks/input_sizes.py --data_path ../shared/data/mvtec /tmp/small_parts --work_dir /tmp/sizes

For every category under the --data_path roots and every setting (--settings, default "224", "384"
and "224 384"; each a quoted list of input sizes), `evaluate.py --method patchcore --input_size ...`
runs in a fresh process (lite0, default options, plus --extra flags). Prints one JSON line per run
and a Markdown table: image / pixel AUROC, fit s, images/s, feature-file MB, and each cost as a
ratio to the first setting's on the same category in the same run (the machine is shared: compare
ratios, not seconds).
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def categories(roots):
    for root in roots:
        for name in sorted(os.listdir(root)):
            if os.path.isdir(os.path.join(root, name, 'train', 'good')):
                yield root, name


def run(root, category, sizes, args):
    out = os.path.join(args.work_dir, f'{category}_{sizes.replace(" ", "-")}{args.tag}')
    subprocess.run([sys.executable, os.path.join(ROOT, 'evaluate.py'), '--data_path', root, '--category', category,
                    '--method', args.method, '--save_path', out, '--model_dir', args.model_dir,
                    '--input_size', *sizes.split(), *args.extra], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, 'metrics.json')) as f:
        return json.load(f)[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data_path', nargs='+', required=True, help='dataset roots (MVTec layout)')
    p.add_argument('--category', nargs='+', default=None, help='only these categories')
    p.add_argument('--settings', nargs='+', default=['224', '384', '224 384'])
    p.add_argument('--method', default='patchcore')
    p.add_argument('--work_dir', required=True)
    p.add_argument('--model_dir', default=os.path.join(ROOT, 'models'))
    p.add_argument('--tag', default='', help='suffix of the run folders')
    p.add_argument('--extra', nargs=argparse.REMAINDER, default=[], help='further evaluate.py flags (last)')
    args = p.parse_args(argv)
    rows = []
    for root, category in categories(args.data_path):
        if args.category and category not in args.category:
            continue
        base = None
        for sizes in args.settings:
            row = run(root, category, sizes, args)
            base = base or row
            row.update(fit_ratio=row['fit_s'] / base['fit_s'], speed_ratio=row['images_per_s'] / base['images_per_s'],
                       file_ratio=row['feature_mb'] / base['feature_mb'])
            print(json.dumps(row), flush=True)
            rows.append(row)
    print('\n| category | input size | image AUROC | pixel AUROC | fit s | images/s | feature file MB |')
    print('|---|---|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["category"]} | {r["input_size"]} | {r["image_auroc"]:.4f} | {r["pixel_auroc"]:.4f} | '
              f'{r["fit_s"]:.1f} ({r["fit_ratio"]:.2f}x) | {r["images_per_s"]:.1f} ({r["speed_ratio"]:.2f}x) | '
              f'{r["feature_mb"]:.1f} ({r["file_ratio"]:.2f}x) |')


if __name__ == '__main__':
    main()
