"""Throughput of score_archive.py on a local Dask cluster against mahalanobisad.py, on the same images.

    python3 benchmarks/archive_throughput.py                     # 1,200 images; local:2 at 3 shard sizes, local:1
    python3 benchmarks/archive_throughput.py --images 2000 --runs local:2@64,local:4@256 --rounds 3

The MVTec bottle and metal_nut images (train and test, 900 and 700 px) are repeated to --images as links in
one folder, so every one is decoded for real. Each round runs, one after the other, the CLI (feature file
reused, --threshold given, figures off) and score_archive.py for each of --runs (SCHEDULER@SHARD_SIZE), all
as subprocesses measured from start to exit (interpreter, model and cluster start included):
- images/s: images / wall seconds;
- images/CPU-s: images / CPU seconds of the run and all its processes (user + sys). On a machine shared with
  other work, wall time measures the neighbours as much as the tool; CPU time is what the run itself costs.
Reports the median over rounds, the ratio of each run to the CLI of the same round, and checks that every
run's scores are identical to the CLI's.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MVTEC = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'mvtec')
sys.path.insert(0, ROOT)
import image_utils  # noqa: E402
from benchmarks.common import link_inputs, repeated  # noqa: E402


def measured(command, cwd):
    """Run `command` -> (wall seconds, CPU seconds of it and its descendants)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode:
        raise SystemExit(f'{" ".join(command)} failed:\n{result.stderr[-2000:]}')
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


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
    names = ['cli'] + [f'archive {scheduler} shard {size}' for scheduler, size in runs]
    rates = {name: [] for name in names}        # images / wall second
    cpu_rates = {name: [] for name in names}    # images / CPU second
    load = []
    with tempfile.TemporaryDirectory() as work:
        folder = link_inputs(repeated(sources, args.images), os.path.join(work, 'archive'))
        feat = args.feat or os.path.join(work, 'train.pkl')
        if not args.feat:
            measured([sys.executable, 'mahalanobisad.py', '-tr', 'train', '-f', feat, '-i', 'images/good_000.png',
                      '--no_figures', '--model_dir', args.model_dir], ROOT)
        for round_ in range(args.rounds):
            report = os.path.join(work, 'cli.json')
            commands = [[sys.executable, 'mahalanobisad.py', '-f', feat, '-i', folder, '-th', '0', '--no_figures',
                         '--json', report, '--model_dir', args.model_dir]]
            outputs = [None]
            for scheduler, size in runs:
                outputs.append(os.path.join(work, f'out-{round_}-{scheduler.replace(":", "")}-{size}'))
                commands.append([sys.executable, 'score_archive.py', '--feat', feat, '--input', folder, '--output',
                                 outputs[-1], '--scheduler', scheduler, '--shard_size', size,
                                 '--model_dir', args.model_dir])
            for name, command, output in zip(names, commands, outputs):
                wall, cpu = measured(command, ROOT)
                rates[name].append(args.images / wall)
                cpu_rates[name].append(args.images / cpu)
                load.append(os.getloadavg()[0])
                if output is None:
                    with open(report) as f:
                        cli = {r['path']: r['score'] for r in json.load(f)['images']}
                elif archive_scores(output) != cli:
                    raise SystemExit(f'{name}: scores differ from the CLI')
            print(f'round {round_ + 1}: ' + ', '.join(f'{n} {rates[n][-1]:.1f}/s {cpu_rates[n][-1]:.1f}/CPU-s'
                                                      for n in names), flush=True)

    print(f'\n{args.images} images (bottle + metal_nut), {os.cpu_count()} cores, load average '
          f'{min(load):.0f}..{max(load):.0f} (this run included), {args.rounds} rounds; every run\'s scores are '
          f'identical to the CLI\'s')
    print(f'{"run":<30}{"images/s":>10}{"vs CLI":>8}{"images/CPU-s":>14}{"vs CLI":>8}')
    for name in names:
        ratio = statistics.median(r / c for r, c in zip(rates[name], rates['cli']))
        cpu_ratio = statistics.median(r / c for r, c in zip(cpu_rates[name], cpu_rates['cli']))
        print(f'{name:<30}{statistics.median(rates[name]):>10.1f}{ratio:>8.2f}'
              f'{statistics.median(cpu_rates[name]):>14.1f}{cpu_ratio:>8.2f}')
    print(json.dumps({'images': args.images, 'rates': rates, 'cpu_rates': cpu_rates, 'load': load}))


if __name__ == '__main__':
    main()
