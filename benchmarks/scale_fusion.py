"""Which fusion of input sizes: the rules tried, on the same fits, per category.

    python3 benchmarks/make_small_parts.py --out /tmp/small_parts
    python3 benchmarks/scale_fusion.py --category ../shared/data/mvtec/bottle ../shared/data/mvtec/metal_nut \
        /tmp/small_parts/bottle_small /tmp/small_parts/metal_nut_small --sizes 224 320 384

Per category, one Detector(method='patchcore', input_size=SIZES) is fitted (one PatchCore per size on
the same training images, each with its held-out scores: meta_['scale_holdout']); every test image
is scored at each size (maps at the largest size, as the fused detector draws them). Then, for each
single size and each set of two or more sizes, image and pixel AUROC of each fusion rule, each size's
values standardised by its own held-out training scores (image scores by the held-out image scores,
maps by the held-out images' largest map values):
- max_z: the largest z-score, (x - mean) / std (fusion.fuse, the rule the tool uses);
- mean_z: the mean of the z-scores;
- max_robust_z: the largest (x - median) / (1.4826 MAD);
- max_ratio: the largest x / mean (every method's scores are distances, >= 0);
- min_p (image only): the smallest conformal p-value, (1 + #{held-out >= x}) / (n + 1), as
  -log p; fisher (image only): Fisher's -2 sum log p.
Prints one JSON line per category and Markdown tables.
"""
import argparse
import itertools
import json
import os
import sys

import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fusion  # noqa: E402
import image_utils  # noqa: E402
from detector import Detector  # noqa: E402
from holdout import HoldoutScores  # noqa: E402


def centre_and_spread(reference, rule):
    reference = np.asarray(reference, np.float64)
    if rule == 'max_robust_z':
        median = np.median(reference)
        return median, 1.4826 * np.median(np.abs(reference - median))
    if rule == 'max_ratio':
        return 0.0, reference.mean()
    return reference.mean(), reference.std(ddof=1)


def fused(values, references, rule):
    """values: per size (N, ...) raw; references: per size (n,) held-out -> (N, ...) fused."""
    if rule in ('min_p', 'fisher'):
        p = [(1 + (np.asarray(r)[None, :] >= v[:, None]).sum(axis=1)) / (len(r) + 1)
             for v, r in zip(values, references)]
        return -np.log(np.min(p, axis=0)) if rule == 'min_p' else -2 * np.sum(np.log(p), axis=0)
    standardised = []
    for v, r in zip(values, references):
        centre, spread = centre_and_spread(r, rule)
        standardised.append((v - centre) / spread)
    return np.mean(standardised, axis=0) if rule == 'mean_z' else np.max(standardised, axis=0)


def score_scales(detector, paths, masks):
    """Each size's raw image scores (S, N) and maps (S, N, O, O) float16, and the masks (N, O, O)."""
    preprocessing, extractor = detector.preprocessing, detector.extractor
    scores, maps, gt = [[] for _ in detector.methods_], [[] for _ in detector.methods_], []
    for start in range(0, len(paths), 16):
        batch = [preprocessing.views(p) for p in paths[start:start + 16]]
        gt += [np.zeros((detector.output_size,) * 2, bool) if m is None else preprocessing.mask_view(m, shape)
               for (_, shape), m in zip(batch, masks[start:start + 16])]
        for scale, method in enumerate(detector.methods_):
            feature_maps = extractor(preprocessing.tensors([views[scale] for views, _ in batch]))
            s, m = method.score(method.features(feature_maps), detector.output_size)
            scores[scale].append(s)
            maps[scale].append(m.astype(np.float16))
    return np.array([np.concatenate(s) for s in scores]), np.array([np.concatenate(m) for m in maps]), np.array(gt)


def evaluate_category(folder, sizes, model_dir):
    train = image_utils.list_images(os.path.join(folder, 'train', 'good'))
    test_dir, gt_dir = os.path.join(folder, 'test'), os.path.join(folder, 'ground_truth')
    paths = image_utils.list_images(test_dir)
    masks = [image_utils.find_mask(p, test_dir, gt_dir) for p in paths]
    detector = Detector(method='patchcore', model_dir=model_dir, input_size=sizes).fit(train)
    holdouts = [HoldoutScores.from_meta(h) for h in detector.meta_['scale_holdout']]
    scores, maps, gt = score_scales(detector, paths, masks)
    labels = gt.reshape(len(gt), -1).any(axis=1)
    pixel_labels = gt.ravel()
    rows = []
    for count in range(1, len(sizes) + 1):
        for chosen in itertools.combinations(range(len(sizes)), count):
            rules = ['single'] if count == 1 else ['max_z', 'mean_z', 'max_robust_z', 'max_ratio', 'min_p', 'fisher']
            for rule in rules:
                if rule == 'single':
                    image, pixel = scores[chosen[0]], maps[chosen[0]]
                else:
                    image = fused([scores[i] for i in chosen], [holdouts[i].image for i in chosen], rule)
                    pixel = (None if rule in ('min_p', 'fisher') else
                             fused([maps[i].astype(np.float32) for i in chosen],
                                   [holdouts[i].pixel_maxima for i in chosen], rule))
                rows.append({'category': os.path.basename(os.path.normpath(folder)),
                             'sizes': ' '.join(str(sizes[i]) for i in chosen), 'rule': rule,
                             'image_auroc': float(roc_auc_score(labels, image)),
                             'pixel_auroc': (None if pixel is None
                                             else float(roc_auc_score(pixel_labels, pixel.ravel())))})
    # The tool's own fusion on all sizes must be what max_z gives here.
    footings = [fusion.Footing.of(h) for h in holdouts]
    assert np.allclose(fusion.fuse(list(scores), footings), fused(list(scores), [h.image for h in holdouts], 'max_z'))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--category', nargs='+', required=True, help='MVTec-layout category folders')
    p.add_argument('--sizes', type=int, nargs='+', default=[224, 320, 384])
    p.add_argument('--model_dir', default=os.path.join(ROOT, 'models'))
    args = p.parse_args(argv)
    everything = []
    for folder in args.category:
        rows = evaluate_category(folder, args.sizes, args.model_dir)
        print(json.dumps(rows), flush=True)
        everything += rows
    print('\n| category | sizes | rule | image AUROC | pixel AUROC |\n|---|---|---|---|---|')
    for row in everything:
        pixel = '-' if row['pixel_auroc'] is None else f'{row["pixel_auroc"]:.4f}'
        print(f'| {row["category"]} | {row["sizes"]} | {row["rule"]} | {row["image_auroc"]:.4f} | {pixel} |')


if __name__ == '__main__':
    main()
