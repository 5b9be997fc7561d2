"""How quantize.py's choices were made: each variant of the static quantization of lite0 measured by the
error it adds to the feature maps, its speed and, optionally, the AUROCs it gives.

    python3 benchmarks/int8_choices.py                      # errors and speed (minutes)
    python3 benchmarks/int8_choices.py --auroc_only --seeds 0 1 2   # image / pixel AUROC per calibration sample

On MVTec metal_nut and bottle (../shared/data/mvtec), lite0:
- error: mean |int8 - float32| / mean |float32| of each feature map, averaged over stages 2-5 (the maps
  PaDiM and PatchCore use), on the test images (defects included) and on 40 held-out training images
  (never in a calibration sample); calibration views: a seeded sample (quantize.calibration_sample) of
  the other training images;
- speed: the backbone alone on one thread, batch 16, best of --repeats runs (the variants alternate, so
  that other load hits them alike), and its ratio to float32;
- --auroc / --auroc_only: PaDiM and PatchCore fitted on every training image's features and scored on
  the test images, as evaluate.py does (the same AUROCs; no hold-out thresholds), with float32 and with
  int8 calibrated on each of --auroc_counts views (a sample per --seeds; 'all': every training image,
  the 40 held out included, no sample).
Prints one JSON line per measurement and Markdown tables.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort
from sklearn.metrics import roc_auc_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import anomaly_model  # noqa: E402
import backbone_graph  # noqa: E402
import image_utils  # noqa: E402
import model_utils  # noqa: E402
import quantize  # noqa: E402

MVTEC = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'mvtec')
STEM = ('_conv_stem', '_conv_stem.relu6')
BLOCK_1 = ('_blocks.1._expand_conv', '_blocks.1._expand_conv.relu6', '_blocks.1._depthwise_conv',
           '_blocks.1._depthwise_conv.relu6', '_blocks.1._project_conv')
USED = {}  # quantize_backbone's defaults
VARIANTS = {
    'QDQ, per channel, MinMax, stem + block 0 float (used)': USED,
    'QOperator': dict(quant_format='QOperator'),
    'weights per tensor': dict(per_channel=False),
    'Percentile calibration': dict(calibration='Percentile'),
    'every node quantized': dict(float_nodes=()),
    'stem float only': dict(float_nodes=STEM),
    'stem + blocks 0-1 float': dict(float_nodes=quantize.FLOAT_NODES + BLOCK_1),
}
CALIBRATION_COUNTS = (8, 16, 32, 64, 128, 'all')
HELD_OUT = 40


def stage_error(reference, outputs):
    """Mean relative error of stages 2-5 (outputs 2..5 of lite0: stem, stage1, stage2, ...)."""
    return float(np.mean([np.abs(a - b).mean() / np.abs(a).mean() for a, b in list(zip(reference, outputs))[2:6]]))


class Category:
    """A category's network views and float32 feature maps, and the split of its training images."""

    def __init__(self, root, spec, onnx_path):
        self.name = os.path.basename(root)
        self.pre = image_utils.Preprocessing((spec.input_size,), spec.mean, spec.std, 8)
        self.train = [self.pre.views(p)[0][0] for p in image_utils.list_images(os.path.join(root, 'train'))]
        test_dir = os.path.join(root, 'test')
        test_paths = image_utils.list_images(test_dir)
        self.test = [self.pre.views(p)[0][0] for p in test_paths]
        masks = [image_utils.find_mask(p, test_dir, os.path.join(root, 'ground_truth')) for p in test_paths]
        self.masks = np.stack([np.zeros(self.test[0].shape[:2], bool) if m is None
                               else self.pre.mask_view(m, image_utils.load_image(p).shape[:2])
                               for m, p in zip(masks, test_paths)])
        self.held_out = np.random.default_rng(99).choice(len(self.train), HELD_OUT, replace=False)
        self.pool = np.setdiff1d(np.arange(len(self.train)), self.held_out)
        float32 = model_utils.FeatureExtractor(onnx_path)
        self.reference = {'test': self.maps(float32, self.test), 'held_out': self.maps(float32, self.held_out_views())}
        self.onnx_path = onnx_path

    def held_out_views(self):
        return [self.train[i] for i in self.held_out]

    def maps(self, extractor, views):
        batches = [extractor(self.pre.tensors(views[i:i + 16])) for i in range(0, len(views), 16)]
        return [np.concatenate(level) for level in zip(*batches)]

    def quantized(self, options, count=quantize.CALIBRATION_IMAGES, seed=0, pool=None):
        """(FeatureExtractor, model bytes, seconds to quantize) of a variant calibrated on `count` views
        of `pool` (default: the training images not held out)."""
        pool = self.pool if pool is None else pool
        count = len(pool) if count == 'all' else int(count)
        sample = pool[quantize.calibration_sample(len(pool), seed, count)]
        start = time.perf_counter()
        model_bytes, _ = quantize.quantize_backbone(self.onnx_path, self.pre.tensors([self.train[i] for i in sample]),
                                                    **options)
        seconds = time.perf_counter() - start
        return model_utils.FeatureExtractor(model_bytes, name='int8'), model_bytes, seconds

    def errors(self, extractor):
        return {'test': stage_error(self.reference['test'], self.maps(extractor, self.test)),
                'held_out': stage_error(self.reference['held_out'], self.maps(extractor, self.held_out_views()))}

    def aurocs(self, extractor):
        """{method: (image AUROC, pixel AUROC)} of PaDiM and PatchCore fitted on every training view."""
        train_maps, test_maps = self.maps(extractor, self.train), self.maps(extractor, self.test)
        labels = self.masks.reshape(len(self.masks), -1).any(axis=1)
        result = {}
        for name in ('padim', 'patchcore'):
            method = anomaly_model.make_method(name)
            method.configure([m.shape[1:] for m in train_maps], self.pre.output_size)
            method.fit(method.features(train_maps))
            scores, maps = method.score(method.features(test_maps), self.pre.output_size)
            result[name] = (round(roc_auc_score(labels, scores), 4),
                            round(roc_auc_score(self.masks.ravel(), maps.ravel()), 4))
        return result


def speeds(models, tensors, repeats):
    """{name: images/s} of each serialized model (None: float32) on one thread, batch 16, best of `repeats`,
    the models alternating."""
    sessions = {}
    for name, model in models.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        sessions[name] = ort.InferenceSession(model, options, providers=['CPUExecutionProvider'])
    best = dict.fromkeys(sessions, np.inf)
    for _ in range(repeats):
        for name, session in sessions.items():
            outputs = [o.name for o in session.get_outputs()]
            start = time.perf_counter()
            session.run(outputs, {session.get_inputs()[0].name: tensors})
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(tensors) / seconds for name, seconds in best.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data_path', default=MVTEC)
    p.add_argument('--categories', nargs='+', default=['metal_nut', 'bottle'])
    p.add_argument('--model_dir', default=os.path.join(ROOT, 'models'))
    p.add_argument('--repeats', type=int, default=30)
    p.add_argument('--auroc', action='store_true', help='also the AUROCs of float32 and the used variant, per seed')
    p.add_argument('--auroc_only', action='store_true', help='only the AUROCs')
    p.add_argument('--auroc_counts', nargs='+', default=['32', 'all'], help="calibration views for the AUROCs")
    p.add_argument('--seeds', type=int, nargs='+', default=[0], help='calibration samples for the AUROCs')
    args = p.parse_args()
    spec, onnx_path = model_utils.resolve_model('lite0', args.model_dir)
    float32 = backbone_graph.feature_graph(onnx_path)[0].SerializeToString()
    for name in args.categories:
        category = Category(os.path.join(args.data_path, name), spec, onnx_path)
        if not args.auroc_only:
            choices(category, float32, args.repeats)
        if args.auroc or args.auroc_only:
            aurocs(category, onnx_path, args.auroc_counts, args.seeds)


def choices(category, float32, repeats):
    """The variants' errors and speeds, and the error against the number of calibration views."""
    name = category.name
    models = {'float32': float32}
    print(f'\n{name}: variant | stages 2-5 error, test / held-out training views | quantize s')
    for variant, options in VARIANTS.items():
        extractor, models[variant], seconds = category.quantized(options)
        errors = category.errors(extractor)
        print(json.dumps({'category': name, 'variant': variant, **errors, 'quantize_s': round(seconds, 1)}))
        print(f"| {variant} | {errors['test']:.4f} / {errors['held_out']:.4f} | {seconds:.1f} |", flush=True)
    print(f'\n{name}: backbone alone, one thread, batch 16 (images/s, x float32)')
    rates = speeds(models, category.pre.tensors(category.test[:16]), repeats)
    for variant, rate in rates.items():
        print(f"| {variant} | {rate:.1f} | {rate / rates['float32']:.2f} |", flush=True)
    print(f'\n{name}: calibration views | stages 2-5 error, test / held-out training views | quantize s')
    for count in CALIBRATION_COUNTS:
        extractor, _, seconds = category.quantized(USED, count)
        errors = category.errors(extractor)
        print(f"| {count} | {errors['test']:.4f} / {errors['held_out']:.4f} | {seconds:.1f} |", flush=True)


def aurocs(category, onnx_path, counts, seeds):
    """Image / pixel AUROCs with float32 and with int8 per calibration count and sample."""
    print(f'\n{category.name}: AUROC image / pixel | padim | patchcore')
    every = np.arange(len(category.train))
    variants = [('float32', lambda: model_utils.FeatureExtractor(onnx_path))]
    for count in counts:
        for seed in (seeds if count != 'all' else seeds[:1]):
            variants.append((f'int8, {count} views' + (f', sample {seed}' if count != 'all' else ''),
                             lambda count=count, seed=seed: category.quantized(USED, count, seed, every)[0]))
    for label, extractor in variants:
        result = category.aurocs(extractor())
        print(json.dumps({'category': category.name, 'backbone': label, **result}))
        print(f'| {label} | ' + ' | '.join('%.4f / %.4f' % result[m] for m in ('padim', 'patchcore')) + ' |',
              flush=True)


if __name__ == '__main__':
    main()
