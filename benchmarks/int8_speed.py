"""float32 against int8 (--int8), in one run: the CLI on image files and on a video, the exported
model, the backbone alone; per input size (issue 24's figures).

    python3 benchmarks/int8_speed.py                                  # metal_nut from ../shared
    python3 benchmarks/int8_speed.py --input_sizes default 384        # needs --input_size (issue 22)

For each input size (`default`: the backbone's own, no flag) and precision (float32, int8), on MVTec
metal_nut (320 x 320 images; --category for another):
1. fit PaDiM and PatchCore on train/good and export each for the test images' size, in one CLI run
   (`-tr ... [--int8] [--input_size S] -f FEAT --export M.onnx --export_size W H`; hold-out thresholds);
2. the CLI on --images test images (repeated, as links), feature file reused, figures off, `--json`:
   images/s timed in a fresh process (common.cli_in_child: from after the imports to the exit);
3. `-v` on a 320 x 320 mp4 of the test images (--frames frames), PaDiM, figures off: frames/s;
4. the exported model in plain onnxruntime (default session options), the test images decoded in
   memory, batch 1 and batch 16: images/s, and its scores against the CLI's (max relative difference,
   verdicts differing beyond 1e-4 of the threshold);
5. the backbone alone (FeatureExtractor, batch 16, the network views in memory): images/s.
Every timed step alternates float32 and int8 and is repeated --rounds times (median), so that load
from other processes hits both alike. Prints a Markdown table, the int8 / float32 ratios, one JSON line.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import cv2
import numpy as np
import onnx
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import image_utils  # noqa: E402
from benchmarks.common import cli_in_child, link_inputs, repeated  # noqa: E402
from benchmarks.live_modes import make_video  # noqa: E402
from detector import Detector  # noqa: E402

MVTEC = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'mvtec')
PRECISIONS = ('float32', 'int8')
METHODS = ('padim', 'patchcore')


def rate(count, seconds):
    return count / seconds


def fit_and_export(method, precision, size, image_size, args, work):
    """The feature file and exported model of (method, precision, size) -> (feat, onnx path)."""
    name = os.path.join(work, f'{method}_{precision}_{size}')
    argv = ['-tr', os.path.join(args.data, 'train'), '--method', method, '-f', name + '.pkl', '--model_dir',
            args.model_dir, '--export', name + '.onnx', '--export_size', *map(str, image_size)]
    argv += ['--int8'] if precision == 'int8' else []
    argv += [] if size == 'default' else ['--input_size', str(size)]
    cli_in_child(argv, cwd=work)  # cwd without images/: thresholds from the training hold-out
    return name + '.pkl', name + '.onnx'


def time_cli(feat, argv, count, model_dir, work):
    """images (or frames) per second of the CLI with the feature file `feat` on `count` inputs."""
    seconds, _ = cli_in_child(['-f', feat, '--model_dir', model_dir, '--no_figures'] + argv, cwd=work)
    return rate(count, seconds)


def time_export(model, images, batch):
    session = ort.InferenceSession(model, providers=['CPUExecutionProvider'])
    session.run(['score'], {'image': images[:batch]})  # warm-up
    start = time.perf_counter()
    scores = np.concatenate([session.run(['score'], {'image': images[i:i + batch]})[0]
                             for i in range(0, len(images), batch)])
    return rate(len(images), time.perf_counter() - start), scores


def time_backbone(feat, images, model_dir):
    detector = Detector.load(feat, model_dir=model_dir)
    tensors = detector.preprocessing.tensors([detector.preprocessing.views(image)[0][0] for image in images])
    extractor = detector.extractor
    extractor(tensors[:16])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(tensors), 16):
        extractor(tensors[i:i + 16])
    return rate(len(tensors), time.perf_counter() - start)


def agreement(export_scores, report, threshold):
    """(max relative difference, verdicts differing) of the export's scores against the CLI's JSON
    report on the same images (the report's inputs are the test images in order, repeated)."""
    with open(report) as f:
        tool = json.load(f)['images'][:len(export_scores)]
    export_scores = export_scores[:len(tool)]
    tool_scores = np.array([r['score'] for r in tool])
    relative = float((np.abs(export_scores - tool_scores) / np.abs(tool_scores)).max())
    near = np.abs(tool_scores - threshold) <= 1e-4 * abs(threshold)
    differing = int(((export_scores >= threshold) != np.array([r['anomaly'] for r in tool]))[~near].sum())
    return relative, differing


def measure(fitted, precision, work, inputs, video, images, args):
    """One round of every timed step for one precision -> {measurement: value}."""
    measured = {}
    for method in METHODS:
        feat, model = fitted[method, precision]
        report = os.path.join(work, f'{method}_{precision}.json')
        measured[f'cli_{method}'] = time_cli(feat, ['--method', method, '-i', inputs, '--json', report], args.images,
                                             args.model_dir, work)
        for batch in (1, 16):
            measured[f'export_{method}_b{batch}'], scores = time_export(model, images, batch)
        threshold = float({p.key: p.value for p in onnx.load(model).metadata_props}['threshold'])
        measured[f'agreement_{method}'] = agreement(scores, report, threshold)
    measured['video_padim'] = time_cli(fitted['padim', precision][0], ['--method', 'padim', '-v', video], args.frames,
                                       args.model_dir, work)
    measured['backbone'] = time_backbone(fitted['padim', precision][0], images, args.model_dir)
    return measured


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--category', default='metal_nut')
    p.add_argument('--data_path', default=MVTEC)
    p.add_argument('--input_sizes', nargs='+', default=['default'],
                   help="network input sizes: 'default' (the backbone's own) and/or numbers (--input_size, issue 22)")
    p.add_argument('--images', type=int, default=345, help='CLI inputs per measurement (test images repeated)')
    p.add_argument('--frames', type=int, default=345, help='frames of the 320 x 320 video')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--model_dir', default=os.path.join(ROOT, 'models'))
    args = p.parse_args()
    args.data = os.path.join(args.data_path, args.category)
    args.model_dir = os.path.abspath(args.model_dir)
    test_paths = image_utils.list_images(os.path.join(args.data, 'test'))
    images = np.stack([cv2.imread(path)[..., ::-1] for path in test_paths])  # what a camera gives: RGB uint8
    image_size = images.shape[2], images.shape[1]
    print(f'{args.category}: {len(test_paths)} test images {image_size[0]} x {image_size[1]}, {os.cpu_count()} cores, '
          f'onnxruntime {ort.__version__}', file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        inputs = link_inputs(repeated(test_paths, args.images), os.path.join(work, 'inputs'))
        video = os.path.join(work, 'video.mp4')
        make_video(video, test_paths, args.frames, (320, 320))
        for size in args.input_sizes:
            fitted = {(m, q): fit_and_export(m, q, size, image_size, args, work) for m in METHODS for q in PRECISIONS}
            rounds = {q: [] for q in PRECISIONS}
            for _ in range(args.rounds):
                for q in PRECISIONS:
                    rounds[q].append(measure(fitted, q, work, inputs, video, images, args))
            for q in PRECISIONS:
                row = {'input_size': size, 'precision': q}
                for key in rounds[q][0]:
                    values = [r[key] for r in rounds[q]]
                    row[key] = values[-1] if key.startswith('agreement') else round(statistics.median(values), 1)
                for m in METHODS:
                    row[f'export_over_cli_{m}'] = round(row[f'export_{m}_b16'] / row[f'cli_{m}'], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print_table(rows)


def print_table(rows):
    keys = ['backbone', 'cli_padim', 'video_padim', 'cli_patchcore', 'export_padim_b1', 'export_padim_b16',
            'export_patchcore_b1', 'export_patchcore_b16', 'export_over_cli_patchcore']
    print('| input size | precision | ' + ' | '.join(keys) + ' | export vs CLI: max rel. diff, verdicts differing '
          '(padim; patchcore) |')
    print('|---' * (len(keys) + 3) + '|')
    for row in rows:
        agreement_text = '; '.join('%.1e, %d' % tuple(row[f'agreement_{m}']) for m in METHODS)
        print(f"| {row['input_size']} | {row['precision']} | " + ' | '.join(str(row[k]) for k in keys)
              + f' | {agreement_text} |')
    print('\nint8 / float32:')
    for size in dict.fromkeys(r['input_size'] for r in rows):
        by = {r['precision']: r for r in rows if r['input_size'] == size}
        print(f'  input size {size}: ' + ', '.join(f'{k} {by["int8"][k] / by["float32"][k]:.2f}x' for k in keys[:-1]))


if __name__ == '__main__':
    main()
