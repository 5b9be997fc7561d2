"""PatchCore at scale: fit time, bank size, scoring speed and peak memory against MahalanobisAD,
for 209 and 836 training views of bottle, and what the nearest-patch index changes.

    python3 benchmarks/patchcore_scale.py                  # bottle, lite0 (about 5 minutes on 2 cores)
    python3 benchmarks/patchcore_scale.py --coverage       # + coverage against the exact greedy (minutes more)

Measured in one run (every ratio is within it):
- fit: a fresh process per fit (mahalanobis on 209 images; patchcore on 209 views; patchcore with
  --aug_num 3, 836 views): fit seconds, memory bank rows, the process's peak memory (VmHWM);
- scoring: the CLI in a fresh process (feature file reused, --threshold given, figures off) on the
  test images repeated to --images: images/s;
- index: the test images scored through the index and by brute force: how often the nearest bank
  patch differs, how far the distances, image scores and maps move, both image AUROCs, and the
  search's milliseconds per image (one thread);
- coverage (--coverage): the largest and the mean distance from a training patch to its nearest bank
  patch, for the chunked coreset (nearest_neighbours.chunked_coreset) and the exact greedy over all patches.
Prints tables and one JSON line.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import image_utils  # noqa: E402
import nearest_neighbours  # noqa: E402
from benchmarks.common import cli_in_child, link_inputs, repeated  # noqa: E402
from detector import Detector  # noqa: E402

BOTTLE = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'mvtec', 'bottle')


def child_fit(train_dir, method, aug_num, feat, model_dir):
    """In a fresh process: fit, save, print {fit_s, bank, peak_mb} as JSON."""
    import evaluate
    detector = Detector(method=method, aug_num=aug_num, model_dir=model_dir)
    start = time.perf_counter()
    detector.fit(image_utils.list_images(train_dir), source=os.path.abspath(train_dir))
    fit_s = time.perf_counter() - start
    detector.save(feat)
    bank = len(detector.method_.bank_) if method == 'patchcore' else None
    print(json.dumps({'fit_s': fit_s, 'bank': bank, 'peak_mb': evaluate.peak_memory_mb()}))


def run_fit(train_dir, method, aug_num, feat, model_dir):
    out = subprocess.run([sys.executable, __file__, '_fit', train_dir, method, str(aug_num), feat, model_dir],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_cli(paths, feat, method, model_dir, batch_size):
    """images/s of the CLI scoring `paths` in a fresh process, timed inside it (model load included)."""
    with tempfile.TemporaryDirectory() as folder:
        inputs = link_inputs(paths, os.path.join(folder, 'inputs'))
        seconds, _ = cli_in_child(['-i', inputs, '-f', feat, '--method', method, '-th', '0', '--no_figures',
                                   '--model_dir', model_dir, '-bs', str(batch_size),
                                   '--json', os.path.join(folder, 'out.json')], cwd=folder)
    return len(paths) / seconds


def patches_of(detector, paths):
    """(N, P, D) PatchCore patches of the images at `paths` (the plain view of each)."""
    spec, method = detector.spec, detector.method_
    batches = []
    for start in range(0, len(paths), 16):
        tensors = [image_utils.to_tensor(image_utils.load_view(p, spec.resize_size, spec.input_size)[0],
                                         spec.mean, spec.std) for p in paths[start:start + 16]]
        batches.append(method.features(detector.extractor(np.stack(tensors)))['patches'])
    return np.concatenate(batches)


def index_effect(feat, paths, labels, model_dir):
    """What the index changes against brute force, on the test images."""
    method = Detector.load(feat, model_dir=model_dir).method_
    patches = patches_of(Detector.load(feat, model_dir=model_dir), paths)
    queries = patches.reshape(-1, patches.shape[-1])
    with threadpool_limits(1):
        start = time.perf_counter()
        approx_distances, approx_indices = method.index_.search(queries)
        approx_ms = (time.perf_counter() - start) * 1000 / len(paths)
        start = time.perf_counter()
        exact_distances, exact_indices = method.index_.search(queries, exact=True)
        exact_ms = (time.perf_counter() - start) * 1000 / len(paths)
        scored = {}
        for exact in (False, True):
            method.exact_search = exact
            parts = [method.score({'patches': patches[i:i + 16]}, 224) for i in range(0, len(patches), 16)]
            scored[exact] = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    moved = (approx_distances - exact_distances) / np.maximum(exact_distances, 1e-6)
    (approx_scores, approx_maps), (exact_scores, exact_maps) = scored[False], scored[True]
    return {'lists': len(method.centroids_), 'nearest_differs': float(np.mean(approx_indices != exact_indices)),
            'distance_moved_mean': float(moved.mean()), 'distance_moved_max': float(moved.max()),
            'score_moved_max': float(np.max(np.abs(approx_scores - exact_scores) / exact_scores)),
            'map_moved_max': float(np.abs(approx_maps - exact_maps).max() / exact_maps.max()),
            'auroc_index': float(roc_auc_score(labels, approx_scores)),
            'auroc_exact': float(roc_auc_score(labels, exact_scores)),
            'search_ms_index': approx_ms, 'search_ms_exact': exact_ms}


def coverage(train_dir, model_dir):
    """Coverage of the chunked coreset and of the exact greedy over the training patches."""
    paths = image_utils.list_images(train_dir)
    detector = Detector(method='patchcore', model_dir=model_dir).fit(paths[:2])  # configured for this backbone
    patches = patches_of(detector, paths)
    flat = patches.reshape(-1, patches.shape[-1])
    params = detector.method_.params
    rows = {}
    start = time.perf_counter()
    chunked = nearest_neighbours.chunked_coreset(patches, params['coreset_ratio'], seed=params['seed'])
    rows['chunked'] = time.perf_counter() - start, chunked
    start = time.perf_counter()
    exact = nearest_neighbours.greedy_coreset(flat, len(chunked), params['projection_dims'], params['seed'])
    rows['exact greedy'] = time.perf_counter() - start, exact
    result = {}
    for name, (seconds, chosen) in rows.items():
        distances = nearest_neighbours.nearest_distances(flat, flat[chosen])[0]
        result[name] = {'s': seconds, 'bank': len(chosen), 'max': float(distances.max()),
                        'mean': float(distances.mean())}
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data', default=BOTTLE, help='an MVTec-layout category folder')
    p.add_argument('--images', type=int, default=166, help='CLI inputs per scoring measurement (test images repeated)')
    p.add_argument('--aug_num', type=int, default=3, help='augmented copies per image of the large fit')
    p.add_argument('--batch_size', type=int, default=16)
    p.add_argument('--model_dir', default=os.path.join(ROOT, 'models'))
    p.add_argument('--coverage', action='store_true', help='also measure coverage against the exact greedy (slow)')
    args = p.parse_args()

    train_dir, test_dir = os.path.join(args.data, 'train', 'good'), os.path.join(args.data, 'test')
    test_paths = image_utils.list_images(test_dir)
    labels = np.array([os.path.relpath(t, test_dir).split(os.sep)[0] != 'good' for t in test_paths])
    cli_paths = repeated(test_paths, args.images)
    n_train = len(image_utils.list_images(train_dir))
    print(f'{args.data}: {n_train} training images, {len(test_paths)} test images, {os.cpu_count()} cores, '
          f'load average {os.getloadavg()[0]:.1f}', file=sys.stderr)
    runs = [('mahalanobis', 'mahalanobis', 0), ('patchcore', 'patchcore', 0),
            (f'patchcore aug {args.aug_num}', 'patchcore', args.aug_num)]
    result = {'load_average_start': os.getloadavg()[0], 'runs': []}
    with tempfile.TemporaryDirectory() as folder:
        for name, method, aug_num in runs:
            feat = os.path.join(folder, f'{method}_{aug_num}.pkl')
            row = dict(name=name, views=n_train * (1 + aug_num), **run_fit(train_dir, method, aug_num, feat,
                                                                           args.model_dir))
            row['images_per_s'] = run_cli(cli_paths, feat, method, args.model_dir, args.batch_size)
            if method == 'patchcore':
                row['index'] = index_effect(feat, test_paths, labels, args.model_dir)
            result['runs'].append(row)
            print(f'{name}: {row}', file=sys.stderr)
    if args.coverage:
        result['coverage'] = coverage(train_dir, args.model_dir)
    result['load_average_end'] = os.getloadavg()[0]

    maha, small, large = result['runs']
    result['ratios'] = {'patchcore_fit_over_mahalanobis': small['fit_s'] / maha['fit_s'],
                        'large_fit_over_small': large['fit_s'] / small['fit_s'],
                        'patchcore_speed_over_mahalanobis': small['images_per_s'] / maha['images_per_s'],
                        'large_time_per_image_over_small': small['images_per_s'] / large['images_per_s']}
    print('| method | training views | fit s | bank | images/s | peak MiB |\n|---|---|---|---|---|---|')
    for row in result['runs']:
        print(f'| {row["name"]} | {row["views"]} | {row["fit_s"]:.1f} | {row["bank"] or "-"} | '
              f'{row["images_per_s"]:.1f} | {row["peak_mb"]:.0f} |')
    print('\n| bank | lists | nearest differs | distance moved mean / max | score moved max | map moved max '
          '| AUROC index / exact | search ms/img index / exact |\n|---|---|---|---|---|---|---|---|')
    for row in result['runs'][1:]:
        x = row['index']
        print(f'| {row["bank"]} | {x["lists"]} | {x["nearest_differs"]:.2e} | {x["distance_moved_mean"]:.1e} / '
              f'{x["distance_moved_max"]:.1e} | {x["score_moved_max"]:.1e} | {x["map_moved_max"]:.1e} | '
              f'{x["auroc_index"]:.4f} / {x["auroc_exact"]:.4f} | {x["search_ms_index"]:.1f} / '
              f'{x["search_ms_exact"]:.1f} |')
    for name, row in result.get('coverage', {}).items():
        print(f'coverage {name}: {row["s"]:.1f} s, bank {row["bank"]}, largest {row["max"]:.3f}, mean {row["mean"]:.4f}')
    print('ratios: ' + ', '.join(f'{k} {v:.2f}' for k, v in result['ratios'].items()))
    print(f'load average {result["load_average_start"]:.1f} at start, {result["load_average_end"]:.1f} at end')
    print(json.dumps(result))


if __name__ == '__main__':
    if sys.argv[1:2] == ['_fit']:
        child_fit(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6])
    else:
        main()
