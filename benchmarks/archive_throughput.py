"""Throughput of score_archive.py on a local Dask cluster against mahalanobisad.py, on the same images.

    python3 benchmarks/archive_throughput.py                     # 1,200 images; local:2 at 3 shard sizes, local:1
    python3 benchmarks/archive_throughput.py --images 2000 --runs local:2@64,local:4@256 --rounds 3

The MVTec bottle and metal_nut images (train and test, 900 and 700 px) are repeated to --images as links in
one folder, so every one is decoded for real. Each round runs, one after the other, the CLI (feature file
reused, --threshold given, figures off) and score_archive.py with each --runs SCHEDULER@SHARD_SIZE, all as
subprocesses timed
from start to exit (interpreter, model and cluster start included). Reports images/s per run, the median
over rounds, each one's ratio to the CLI of the same round, and checks that the scores are identical.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MVTEC = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'mvtec')
sys.path.insert(0, ROOT)
import image_utils  # noqa: E402


def timed(command, cwd):
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f'{" ".join(command)} failed:\n{result.stderr[-2000:]}')
    return time.perf_counter() - start


def archive_scores(output):
    scores = {}
    for name in sorted(os.listdir(output)):
        if name.startswith('part-'):
            with open(os.path.join(output, name)) as f:
                scores.update((r['path'], r['score']) for r in map(json.loads, f))
    return scores


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--images', type=int, default=1200)
    p.add_argument('--runs', default='local:2@64,local:2@256,local:2@1024,local:1@256',
                   help='score_archive.py runs: comma-separated SCHEDULER@SHARD_SIZE')
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--feat', default=None, help='feature file (default: fitted here on train/)')
    p.add_argument('--model_dir', default=os.path.join(ROOT, 'models'))
    args = p.parse_args()
    runs = [run.split('@') for run in args.runs.split(',')]

    sources = image_utils.list_images([os.path.join(MVTEC, c) for c in ('bottle', 'metal_nut')])
    sources = [s for s in sources if '/ground_truth/' not in s]
    with tempfile.TemporaryDirectory() as work:
        folder = os.path.join(work, 'archive')
        os.makedirs(folder)
        for i in range(args.images):
            os.symlink(sources[i % len(sources)], os.path.join(folder, f'{i:06d}.png'))
        feat = args.feat or os.path.join(work, 'train.pkl')
        if not args.feat:
            timed([sys.executable, 'mahalanobisad.py', '-tr', 'train', '-f', feat, '-i', 'images/good_000.png',
                   '--no_figures', '--model_dir', args.model_dir], ROOT)
        common = ['--model_dir', args.model_dir]
        rates = {'cli': []} | {f'archive {s} shard {n}': [] for s, n in runs}
        ratios = {f'archive {s} shard {n}': [] for s, n in runs}
        for round_ in range(args.rounds):
            report = os.path.join(work, 'cli.json')
            seconds = timed([sys.executable, 'mahalanobisad.py', '-f', feat, '-i', folder, '-th', '0',
                             '--no_figures', '--json', report] + common, ROOT)
            cli_rate = args.images / seconds
            rates['cli'].append(cli_rate)
            with open(report) as f:
                cli = {r['path']: r['score'] for r in json.load(f)['images']}
            for scheduler, size in runs:
                name = f'archive {scheduler} shard {size}'
                output = os.path.join(work, f'out-{round_}-{scheduler.replace(":", "")}-{size}')
                seconds = timed([sys.executable, 'score_archive.py', '--feat', feat, '--input', folder,
                                 '--output', output, '--scheduler', scheduler, '--shard_size', size] + common, ROOT)
                rates[name].append(args.images / seconds)
                ratios[name].append(rates[name][-1] / cli_rate)
                if archive_scores(output) != cli:
                    raise SystemExit(f'{name}: scores differ from the CLI')
            print(f'round {round_ + 1}: ' + ', '.join(f'{k} {v[-1]:.1f}' for k, v in rates.items()) + ' images/s',
                  flush=True)

    print(f'\n{args.images} images (bottle + metal_nut), {os.cpu_count()} cores, load average '
          f'{os.getloadavg()[0]:.1f}, {args.rounds} rounds; scores identical to the CLI')
    print(f'{"run":<32}{"images/s (median)":>18}{"vs CLI (median)":>18}')
    for name, values in rates.items():
        ratio = statistics.median(ratios[name]) if name in ratios else 1.0
        print(f'{name:<32}{statistics.median(values):>18.1f}{ratio:>18.2f}')
    print(json.dumps({'images': args.images, 'rates': rates, 'ratios': ratios}))


if __name__ == '__main__':
    main()
