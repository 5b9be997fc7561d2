"""The exported ONNX model against the tool on MVTec categories: exactness, speed and file size.

    python3 benchmarks/export_check.py --data_path ../shared/data/mvtec --work_dir export_runs

Per category and method, in one run:
1. `mahalanobisad.py -tr train --test_dir test --gt_dir ground_truth --export M.onnx --export_size W H`
   (fit, F1-optimal thresholds from the labelled test set, export for the test images' size; the
   feature file is kept in --work_dir and reused);
2. `mahalanobisad.py -i test --threshold T --json` with the exported threshold T, timed in-process
   (backbone opening included, figures off): the tool's scores and its images/s;
3. the exported model in plain onnxruntime (default session options) on the same images decoded in
   memory: batch 1 and batch 16, timed, then the decode (cv2.imread) alone.
Prints one JSON line per (category, method) and a Markdown table: the maximum relative score
difference, verdicts that differ, file size, and the throughputs.
"""
import argparse
import json
import os
import sys
import time

import cv2
import numpy as np
import onnx
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import anomaly_model  # noqa: E402
import image_utils  # noqa: E402
import mahalanobisad  # noqa: E402


def rate(count, seconds):
    return count / seconds


def check(category, method, args):
    folder = os.path.join(args.data_path, category)
    test, gt = os.path.join(folder, 'test'), os.path.join(folder, 'ground_truth')
    feat = os.path.join(args.work_dir, f'{category}_{method}.pkl')
    model = os.path.join(args.work_dir, f'{category}_{method}.onnx')
    common = ['-tr', os.path.join(folder, 'train'), '--method', method, '-f', feat, '--model_dir', args.model_dir]
    height, width = cv2.imread(image_utils.list_images(test)[0]).shape[:2]  # MVTec copies: train and test sizes differ
    assert mahalanobisad.run(common + ['--test_dir', test, '--gt_dir', gt, '--export', model,
                                       '--export_size', str(width), str(height)]) == 0
    threshold = {p.key: p.value for p in onnx.load(model).metadata_props}['threshold']

    report = os.path.join(args.work_dir, f'{category}_{method}.json')
    start = time.perf_counter()
    assert mahalanobisad.run(common + ['-i', test, '--threshold', threshold, '--no_figures', '--json', report]) == 0
    cli_seconds = time.perf_counter() - start
    with open(report) as f:
        tool = json.load(f)['images']
    paths = [r['path'] for r in tool]
    tool_scores = np.array([r['score'] for r in tool])

    start = time.perf_counter()
    images = np.stack([cv2.imread(p)[..., ::-1] for p in paths])  # what a camera gives: RGB uint8
    decode_seconds = time.perf_counter() - start
    session = ort.InferenceSession(model, providers=['CPUExecutionProvider'])
    session.run(['score'], {'image': images[:1]})  # warm-up
    timings = {}
    for batch in (1, 16):
        start = time.perf_counter()
        outputs = [session.run(['score', 'anomaly'], {'image': images[i:i + batch]}) for i in range(0, len(images), batch)]
        timings[batch] = time.perf_counter() - start
    scores = np.concatenate([o[0] for o in outputs])
    verdicts = np.concatenate([o[1] for o in outputs])
    relative = np.abs(scores - tool_scores) / np.abs(tool_scores)
    tolerance = 1e-4 * abs(float(threshold))
    tool_verdicts = np.array([r['anomaly'] for r in tool])
    differ = (verdicts != tool_verdicts) & (np.abs(tool_scores - float(threshold)) > tolerance)
    return {'category': category, 'method': method, 'images': len(paths),
            'image_size': list(images.shape[1:3][::-1]), 'max_relative_difference': float(relative.max()),
            'verdicts_differing': int(differ.sum()), 'file_mb': os.path.getsize(model) / 2 ** 20,
            'cli_images_per_s': rate(len(paths), cli_seconds),
            'onnx_batch1_images_per_s': rate(len(paths), timings[1]),
            'onnx_batch16_images_per_s': rate(len(paths), timings[16]),
            'decode_images_per_s': rate(len(paths), decode_seconds)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data_path', default=os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'mvtec'))
    p.add_argument('--categories', nargs='+', default=['bottle', 'metal_nut'])
    p.add_argument('--methods', nargs='+', default=list(anomaly_model.METHODS))
    p.add_argument('--work_dir', default='export_runs', help='feature files, models and JSON reports')
    p.add_argument('--model_dir', default='models')
    args = p.parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    rows = []
    for category in args.categories:
        if not os.path.isdir(os.path.join(args.data_path, category)):
            raise SystemExit(f'no category {category} in {args.data_path}')
        for method in args.methods:
            rows.append(check(category, method, args))
            print(json.dumps(rows[-1]), flush=True)
    print('| category | method | images | max rel. score diff | verdicts differing | file MB | CLI img/s '
          '| ONNX batch 1 img/s | ONNX batch 16 img/s | decode img/s |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['category']} | {r['method']} | {r['images']} | {r['max_relative_difference']:.1e} | "
              f"{r['verdicts_differing']} | {r['file_mb']:.1f} | {r['cli_images_per_s']:.1f} | "
              f"{r['onnx_batch1_images_per_s']:.1f} | {r['onnx_batch16_images_per_s']:.1f} | "
              f"{r['decode_images_per_s']:.1f} |")


if __name__ == '__main__':
    main()
