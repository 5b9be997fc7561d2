"""Throughput of scoring: each stage alone, the bound they imply, the tool end to end, and a peer.

    python3 benchmarks/throughput.py                      # bottle test images, full resolution
    python3 benchmarks/throughput.py --images 400 --scaling 100,1000,5000 --fit_sizes 25,50,100,200

Measured in one run on the same inputs (the test images repeated to --images):
- decode:   load + preprocess alone, in the tool's thread pool over all cores;
- backbone: lite0 alone on ready tensors, batched, all cores;
- bound:    what the two imply when overlapped on the same cores, 1 / (1/decode + 1/backbone);
- e2e:      `mahalanobisad.py` in-process (feature file reused, --threshold given, figures off), from
            argument parsing to the last verdict (model loading included);
- peer:     an ailia-style sequential flow written here: PIL decode and Lanczos resize, one image per
            backbone run, per-sample scipy Mahalanobis per level.
Prints a table and one JSON line. --scaling runs the CLI in subprocesses on 100, 1,000, ... inputs and
reports images/s and peak memory; --fit_sizes times fitting on that many training images.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image
from scipy.spatial.distance import mahalanobis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import image_utils  # noqa: E402
import mahalanobisad  # noqa: E402
import model_utils  # noqa: E402
from benchmarks.common import cli_in_child, link_inputs, repeated  # noqa: E402
from detector import Detector  # noqa: E402

BOTTLE = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'mvtec', 'bottle')


def rate(count, seconds):
    return count / seconds


def time_decode(paths, spec, batch_size):
    def load(path):  # what the tool does per image before the backbone
        view, _ = image_utils.load_view(path, spec.resize_size, spec.input_size)
        return image_utils.to_tensor(view, spec.mean, spec.std)
    start = time.perf_counter()
    for _ in image_utils.stream(paths, load, batch_size):
        pass
    return rate(len(paths), time.perf_counter() - start)


def time_backbone(extractor, spec, count, batch_size):
    batch = np.random.default_rng(0).standard_normal((batch_size, 3, spec.input_size, spec.input_size)).astype(np.float32)
    extractor(batch)  # warm-up
    runs = max(1, count // batch_size)
    start = time.perf_counter()
    for _ in range(runs):
        extractor(batch)
    return rate(runs * batch_size, time.perf_counter() - start)


def time_e2e(paths, feat, threshold, model_dir, batch_size):
    with tempfile.TemporaryDirectory() as folder:
        listing = link_inputs(paths, os.path.join(folder, 'inputs'))
        start = time.perf_counter()
        code = mahalanobisad.run(['-i', listing, '-f', feat, '-th', str(threshold), '--no_figures',
                                  '--model_dir', model_dir, '-bs', str(batch_size),
                                  '--json', os.path.join(folder, 'out.json')])
        seconds = time.perf_counter() - start
        assert code == 0
    return rate(len(paths), seconds)


def time_peer(paths, extractor, spec, image_model):
    """ailia-style: one image at a time, PIL Lanczos, per-sample scipy Mahalanobis."""
    mean, std = np.array(spec.mean, np.float32), np.array(spec.std, np.float32)
    inverses = [np.asarray(p) for p in image_model.precisions_]
    start = time.perf_counter()
    for path in paths:
        image = Image.open(path).convert('RGB')
        scale = spec.resize_size / min(image.size)
        image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)), Image.LANCZOS)
        left, top = (image.size[0] - spec.input_size) // 2, (image.size[1] - spec.input_size) // 2
        image = image.crop((left, top, left + spec.input_size, top + spec.input_size))
        x = ((np.asarray(image, np.float32) / 255 - mean) / std).transpose(2, 0, 1)[None]
        pooled = [m.mean(axis=(2, 3))[0] for m in extractor(x)]
        sum(mahalanobis(f, mu, inv) for f, mu, inv in zip(pooled, image_model.means_, inverses))
    return rate(len(paths), time.perf_counter() - start)


def scaling(sizes, test_paths, feat, threshold, model_dir):
    """images/s and peak memory (MiB) of the CLI in a fresh process per input count."""
    rows = []
    for count in sizes:
        with tempfile.TemporaryDirectory() as folder:
            seconds, peak_mb = cli_in_child(['-i', link_inputs(repeated(test_paths, count), folder), '-f', feat,
                                             '-th', str(threshold), '--no_figures', '--model_dir', model_dir,
                                             '--json', os.path.join(folder, 'o.json')])
        rows.append({'inputs': count, 'images_per_s': rate(count, seconds), 'peak_mb': peak_mb})
    return rows


def fit_scaling(sizes, train_paths, model_dir, batch_size):
    rows = []
    for count in sizes:
        start = time.perf_counter()
        Detector(model_dir=model_dir, batch_size=batch_size).fit(train_paths[:count])
        rows.append({'train_images': count, 'fit_s': time.perf_counter() - start})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--test_dir', default=os.path.join(BOTTLE, 'test'))
    p.add_argument('--train_dir', default=os.path.join(BOTTLE, 'train', 'good'))
    p.add_argument('--images', type=int, default=240, help='inputs per measurement (test images repeated)')
    p.add_argument('--batch_size', type=int, default=16)
    p.add_argument('--model_dir', default=os.path.join(ROOT, 'models'))
    p.add_argument('--scaling', default='', help='comma-separated input counts for the scaling runs')
    p.add_argument('--fit_sizes', default='', help='comma-separated training-set sizes to time fitting on')
    args = p.parse_args()

    spec, onnx_path = model_utils.resolve_model('lite0', args.model_dir)
    extractor = model_utils.FeatureExtractor(onnx_path)
    test_paths = image_utils.list_images(args.test_dir)
    train_paths = image_utils.list_images(args.train_dir)
    paths = repeated(test_paths, args.images)
    print(f'{len(paths)} inputs from {args.test_dir} ({len(test_paths)} files), {os.cpu_count()} cores, '
          f'lite0, batch {args.batch_size}', file=sys.stderr)

    with tempfile.TemporaryDirectory() as folder:
        feat = os.path.join(folder, 'bottle.pkl')
        assert mahalanobisad.run(['-tr', args.train_dir, '-f', feat, '-i', test_paths[0], '-th', '0',
                                  '--no_figures', '--model_dir', args.model_dir]) == 0
        fitted = Detector.load(feat, model_dir=args.model_dir)
        image_model = fitted.method_.image_model_
        threshold = fitted.threshold_

        result = {'inputs': len(paths)}
        result['decode'] = time_decode(paths, spec, args.batch_size)
        result['backbone'] = time_backbone(extractor, spec, len(paths), args.batch_size)
        result['bound'] = 1 / (1 / result['decode'] + 1 / result['backbone'])
        result['e2e'] = time_e2e(paths, feat, threshold, args.model_dir, args.batch_size)
        result['peer'] = time_peer(paths[:max(40, len(paths) // 4)], extractor, spec, image_model)
        result['e2e_over_bound'] = result['e2e'] / result['bound']
        result['e2e_over_peer'] = result['e2e'] / result['peer']
        if args.scaling:
            result['scaling'] = scaling([int(n) for n in args.scaling.split(',')], test_paths, feat, threshold,
                                        args.model_dir)
        if args.fit_sizes:
            result['fit_scaling'] = fit_scaling([int(n) for n in args.fit_sizes.split(',')], train_paths,
                                                args.model_dir, args.batch_size)

    print('stage | images/s')
    for key in ('decode', 'backbone', 'bound', 'e2e', 'peer'):
        print(f'{key} | {result[key]:.1f}')
    print(f'e2e / bound = {result["e2e_over_bound"]:.2f}, e2e / peer = {result["e2e_over_peer"]:.2f}')
    for row in result.get('scaling', []):
        print(f'{row["inputs"]} inputs: {row["images_per_s"]:.1f} images/s, peak {row["peak_mb"]:.0f} MiB')
    for row in result.get('fit_scaling', []):
        print(f'fit on {row["train_images"]} images: {row["fit_s"]:.1f} s')
    print(json.dumps(result))


if __name__ == '__main__':
    main()
