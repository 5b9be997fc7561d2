"""MVTec-style evaluation: accuracy and speed per category, with the tool's own fit and score code.

    python3 evaluate.py --data_path ../shared/data/mvtec                     # every category found
    python3 evaluate.py --data_path DATA --category bottle -m lite0 --save_path results/

A dataset root holds one folder per category in the MVTec AD layout: train/good/, test/<defect>/,
ground_truth/<defect>/NNN_mask.png (a category without ground_truth/ is evaluated image-level only).
"""
import argparse
import csv
import io
import json
import logging
import os
import resource
import sys
import tempfile
import time

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402
from sklearn.metrics import auc, roc_auc_score, roc_curve  # noqa: E402

import cli  # noqa: E402
import image_utils  # noqa: E402
import plot_utils  # noqa: E402
import thresholds  # noqa: E402
from detector import pixel_arrays  # noqa: E402
from errors import UsageError  # noqa: E402
from file_io import atomic_write_bytes  # noqa: E402

logger = logging.getLogger('evaluate')

# Good-images-only thresholds (the training hold-out) reported at these false-positive rates, every run.
REPORTED_FPRS = (0.01, 0.05)
FPR_KEYS = tuple(f'{rate}_{what}' for rate in ['default'] + [f'fpr{round(100 * a):02d}' for a in REPORTED_FPRS]
                 for what in ('test_fpr', 'recall', 'oracle_recall', 'map_fpr'))
METRIC_KEYS = ('category', 'method', 'model', 'input_size', 'image_auroc', 'pixel_auroc', 'aupro', 'image_f1',
               'fit_s', 'images_per_s', 'peak_mb', 'feature_mb') + FPR_KEYS + (
               'target_fpr', 'test_fpr', 'test_recall', 'test_oracle_recall', 'test_map_fpr',
               'planted', 'planted_excluded', 'excluded')
NAME_KEYS = METRIC_KEYS[:4]  # what was evaluated; the mean row repeats the first row's
OPTIONAL_KEYS = METRIC_KEYS[METRIC_KEYS.index(FPR_KEYS[0]):]  # filled in by holdout reports, --fpr, --contaminate
COUNT_KEYS = ('planted', 'planted_excluded', 'excluded')  # summed, not averaged, in the mean row
EXAMPLES_PER_END = 2  # figures of the best and of the worst scored defects


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------

def aupro(masks, maps, max_fpr=0.3):
    """Area under the per-region-overlap curve up to `max_fpr`, normalised to [0, 1] (MVTec AD).

    masks: bool (N, H, W) ground truth; maps: float (N, H, W) anomaly maps. For every threshold,
    PRO is the mean over all connected defect regions (8-connected, as in MVTec's evaluation code:
    regions touching at a corner are one) of the fraction of the region flagged, and
    FPR the fraction of defect-free pixels flagged; the curve is integrated over FPR in [0, max_fpr].
    Exact at every distinct score (one sort, cumulative sums), as in the MVTec AD evaluation code.
    Returns None when there are no defect regions.
    """
    masks, maps = np.asarray(masks, bool), np.asarray(maps, np.float64)
    regions = np.zeros(masks.shape, np.int64)
    n_regions = 0
    for i, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions[i] = np.where(labels > 0, labels + n_regions, 0)
        n_regions += count
    if n_regions == 0:
        return None
    region_sizes = np.bincount(regions.ravel(), minlength=n_regions + 1)
    # Each defect pixel adds 1 / (its region's size * number of regions) to PRO when flagged;
    # each normal pixel adds 1 / (number of normal pixels) to FPR.
    pro_weight = np.where(regions > 0, 1.0 / (region_sizes[regions] * n_regions), 0.0).ravel()
    fpr_weight = np.where(regions == 0, 1.0 / (regions == 0).sum(), 0.0).ravel()
    order = np.argsort(-maps.ravel(), kind='stable')
    scores = maps.ravel()[order]
    fpr, pro = np.cumsum(fpr_weight[order]), np.cumsum(pro_weight[order])
    last_of_each_score = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]  # ties flip together
    fpr, pro = np.r_[0.0, fpr[last_of_each_score]], np.r_[0.0, pro[last_of_each_score]]
    inside = fpr <= max_fpr
    end_pro = np.interp(max_fpr, fpr, pro)
    fpr, pro = np.r_[fpr[inside], max_fpr], np.r_[pro[inside], end_pro]
    return float(auc(fpr, pro) / max_fpr)


def oracle_recall(labels, scores, fpr):
    """The recall of the best threshold a person with the test set could choose at false-positive rate
    `fpr`: the lowest threshold that flags at most floor(fpr x n_good) of the normal test images.
    labels (M,) bool, true = defective; scores (M,)."""
    good = np.sort(np.asarray(scores)[~labels])[::-1]
    allowed = int(np.floor(fpr * len(good) + 1e-9))  # normal images that may lie above the threshold
    cut = good[allowed] if allowed < len(good) else -np.inf
    return float(np.mean(np.asarray(scores)[labels] > cut))


def holdout_report(detector, scored, labels, scores, fpr=None):
    """The good-images-only thresholds for `fpr` (the training hold-out's; None: the tool's default) on the
    test set -> (the image threshold's FPR on the normal test images, its recall on the defective ones,
    oracle_recall at the rate it promises, the share of normal test images whose map shows any pixel at or
    above the pixel threshold, or None without maps)."""
    chosen = thresholds.from_holdout(detector.holdout_, fpr, detector.localizes, log=False)
    flagged = scores >= chosen.image
    map_fpr = None if chosen.pixel is None else float(np.mean([s.anomaly_map.max() >= chosen.pixel
                                                               for s, label in zip(scored, labels) if not label]))
    return (float(flagged[~labels].mean()), float(flagged[labels].mean()),
            oracle_recall(labels, scores, chosen.target_fpr), map_fpr)


def peak_memory_mb():
    """Peak resident memory of this process since the last reset_peak_memory(), MiB."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory():
    """Start a new peak-memory window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass  # elsewhere the peak is the process's, since its start


# ----------------------------------------------------------------------------------------------
# one category
# ----------------------------------------------------------------------------------------------

def is_defective(path, test_dir):
    """Whether a test image lies outside test/good (MVTec's layout)."""
    return os.path.relpath(path, test_dir).split(os.sep)[0] != 'good'


def plant_defects(train_paths, test_paths, test_dir, fraction, seed):
    """The contamination protocol (Rippel et al. 2021): a seeded `fraction` (of the number of training
    images) of the defective test images moves into the training set -> (train, test, planted)."""
    defective = [p for p in test_paths if is_defective(p, test_dir)]
    count = int(round(fraction * len(train_paths)))
    if count > len(defective):
        raise UsageError(f'--contaminate {fraction} needs {count} defective test images, '
                                       f'{test_dir} has {len(defective)}')
    planted = set(np.random.default_rng(seed).choice(defective, count, replace=False).tolist())
    return train_paths + sorted(planted), [p for p in test_paths if p not in planted], sorted(planted)


def evaluate_category(root, args):
    """Fit on root/train/good, score root/test -> (metrics row, inspected test images, their labels,
    the Detector, (masks, maps) from `pixel_arrays` or None).

    Thresholds are F1-optimal on the test set (the pixel one where there are masks, else the training
    hold-out's); with --fpr, the training hold-out's for that rate, whose false-positive rate and
    recall on the test set the row reports. With --contaminate, defective test images are planted
    among the training images first (`plant_defects`); with --clean_baseline as well, they only leave
    the test set (the clean fit on the same test set: the baseline of the contamination's AUROC loss)."""
    category = os.path.basename(os.path.normpath(root))
    train_dir = os.path.join(root, 'train', 'good')
    train_paths = image_utils.list_images(train_dir)
    test_dir, gt_dir = os.path.join(root, 'test'), os.path.join(root, 'ground_truth')
    test_paths = image_utils.list_images(test_dir)
    has_ground_truth = os.path.isdir(gt_dir)
    planted = None
    if args.contaminate:
        contaminated, test_paths, planted = plant_defects(train_paths, test_paths, test_dir, args.contaminate,
                                                          args.seed)
        if args.clean_baseline:
            logger.info('%s: %d defective test images withheld (clean baseline: not planted)', category, len(planted))
            planted = []
        else:
            train_paths = contaminated
            logger.info('%s: planted %d defective test images among the training images', category, len(planted))
    logger.info('%s: %d train images, %d test images%s', category, len(train_paths), len(test_paths),
                '' if has_ground_truth else ' (no ground_truth/: image-level only)')

    reset_peak_memory()
    start = time.perf_counter()
    detector = cli.detector_from_args(args).fit(train_paths, source=os.path.abspath(train_dir))
    fit_s = time.perf_counter() - start
    if args.exact_search:
        for method in detector.methods_:
            method.exact_search = True
    with tempfile.TemporaryDirectory() as folder:  # the size of the feature file the CLI would write
        feature_path = os.path.join(folder, 'features.pkl')
        detector.save(feature_path)
        feature_mb = os.path.getsize(feature_path) / 2 ** 20

    start = time.perf_counter()
    masks = [image_utils.find_mask(p, test_dir, gt_dir) for p in test_paths] if has_ground_truth else None
    scored = [r for r in detector.inspect(test_paths, masks, desc=f'{category}: score') if not r.error]
    images_per_s = len(scored) / (time.perf_counter() - start)

    # An image is anomalous if it has a defect mask, or (without ground truth) lies outside test/good.
    labels = np.array([s.gt_mask.any() if s.gt_mask is not None else is_defective(s.path, test_dir)
                       for s in scored])
    scores = np.array([s.score for s in scored])
    if labels.all() or not labels.any():
        raise UsageError(f'{test_dir} needs both good and defective images to evaluate')
    if has_ground_truth:
        image_f1 = detector.calibrate_results(scored, source=f'{category} test set').thresholds_.calibration['image_f1']
    else:  # labels from the folders: the image threshold only
        threshold, image_f1 = thresholds.f1_optimal_threshold(labels, scores)
        detector.set_threshold(threshold, f'F1-optimal on {category} test set')
    row = {'category': category, 'method': detector.method, 'model': detector.spec.name,
           'input_size': ' '.join(map(str, detector.input_sizes)),
           'image_auroc': float(roc_auc_score(labels, scores)), 'pixel_auroc': None, 'aupro': None,
           'image_f1': image_f1, 'fit_s': fit_s, 'images_per_s': images_per_s,
           'peak_mb': peak_memory_mb(), 'feature_mb': feature_mb}
    row.update(dict.fromkeys(OPTIONAL_KEYS), excluded=len(detector.meta_['excluded_train_images']))
    for i, fpr in enumerate((None,) + REPORTED_FPRS):
        row.update(zip(FPR_KEYS[4 * i:4 * i + 4], holdout_report(detector, scored, labels, scores, fpr)))
    if planted is not None:
        row.update(planted=len(planted),
                   planted_excluded=len(set(planted) & set(detector.meta_['excluded_train_images'])))
    pixels = None
    if has_ground_truth and detector.localizes:
        pixels = pixel_arrays(scored)
        row['pixel_auroc'] = float(roc_auc_score(pixels[0].ravel(), pixels[1].ravel()))
        row['aupro'] = aupro(*pixels)
    if args.fpr is not None:  # the figures show these thresholds
        row.update(zip(('test_fpr', 'test_recall', 'test_oracle_recall', 'test_map_fpr'),
                       holdout_report(detector, scored, labels, scores, args.fpr)), target_fpr=args.fpr)
        detector.use_holdout_thresholds(fpr=args.fpr)
    return row, scored, labels, detector, pixels


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------

def save_roc_figure(path, category, labels, scores, title):
    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f'AUROC {roc_auc_score(labels, scores):.4f}')
    ax.plot([0, 1], [0, 1], color='gray', linestyle=':')
    ax.set(xlabel='false positive rate', ylabel='true positive rate', title=f'{category}: {title}',
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc='lower right')
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def save_category_figures(folder, row, scored, labels, detector, pixels):
    """ROC curves (image-level, and pixel-level where there are masks) and example figures."""
    category = row['category']
    scores = np.array([s.score for s in scored])
    save_roc_figure(os.path.join(folder, f'{category}_image_roc.png'), category, labels, scores, 'image ROC')
    if pixels is not None:
        save_roc_figure(os.path.join(folder, f'{category}_pixel_roc.png'), category,
                        pixels[0].ravel(), pixels[1].ravel(), 'pixel ROC')
    defects = sorted((s for s, label in zip(scored, labels) if label), key=lambda s: s.score)
    examples = {'worst': defects[:EXAMPLES_PER_END], 'best': defects[::-1][:EXAMPLES_PER_END]}
    for kind, chosen in examples.items():
        for rank, s in enumerate(chosen):
            plot_utils.save_figure(os.path.join(folder, f'{category}_{kind}{rank}.png'), s.view, s.gt_mask,
                                   s.anomaly_map, s.score, detector.threshold_, detector.pixel_threshold_,
                                   title=f'{kind} defect #{rank + 1}: {s.path}')


def format_table(rows):
    columns = [('category', '{}'), ('input_size', '{}'), ('image_auroc', '{:.4f}'), ('pixel_auroc', '{:.4f}'),
               ('aupro', '{:.4f}'),
               ('image_f1', '{:.4f}'), ('fit_s', '{:.1f}'), ('images_per_s', '{:.1f}'), ('peak_mb', '{:.0f}'),
               ('feature_mb', '{:.1f}')]
    columns += [(name, '{:.4f}' if name.startswith(('target', 'test', 'fpr', 'default')) else '{}')
                for name in OPTIONAL_KEYS
                if any(row[name] is not None for row in rows)]
    lines = [' | '.join(name for name, _ in columns)]
    for row in rows:
        lines.append(' | '.join('-' if row[name] is None else fmt.format(row[name]) for name, fmt in columns))
    return '\n'.join(lines)


def mean_row(rows):
    mean = dict({key: rows[0][key] for key in NAME_KEYS}, category='mean')
    for key in METRIC_KEYS[len(NAME_KEYS):]:
        values = [r[key] for r in rows if r[key] is not None]
        mean[key] = (int(np.sum(values)) if key in COUNT_KEYS else float(np.mean(values))) if values else None
    mean['peak_mb'] = max(r['peak_mb'] for r in rows)
    return mean


def write_results(folder, rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_KEYS, lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(os.path.join(folder, 'metrics.csv'), buffer.getvalue().encode())
    atomic_write_bytes(os.path.join(folder, 'metrics.json'), json.dumps(rows, indent=1).encode())


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = cli.OneLineArgumentParser(prog='evaluate.py', description=__doc__.split('\n\n')[0],
                                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--data_path', type=cli.existing_dir, required=True,
                   help='dataset root: one MVTec-layout folder per category')
    p.add_argument('--category', action='append', default=None,
                   help='category to evaluate (repeatable); default every category found')
    p.add_argument('--save_path', type=cli.output_dir, default='results',
                   help='folder for metrics.csv/json and figures')
    p.add_argument('--contaminate', type=cli.open_fraction, default=None, metavar='FRACTION',
                   help='move a seeded FRACTION (of the number of training images) of the defective test images '
                        'into the training set (Rippel et al. 2021)')
    p.add_argument('--clean_baseline', action='store_true',
                   help='with --contaminate: withhold the same defective test images from the test set but do not '
                        'plant them (the clean fit the contaminated one is compared with)')
    cli.add_holdout_arguments(p)
    p.add_argument('--exact_search', action='store_true',
                   help='patchcore: score with brute-force nearest patches instead of the index')
    cli.add_model_arguments(p)
    args = p.parse_args(argv)
    if args.clean_baseline and not args.contaminate:
        p.error('--clean_baseline needs --contaminate FRACTION (which test images to withhold)')
    return args


def find_categories(data_path, requested):
    if not os.path.isdir(data_path):
        raise UsageError(f'no such directory: {data_path}')
    found = sorted(d for d in os.listdir(data_path) if os.path.isdir(os.path.join(data_path, d, 'train', 'good')))
    if requested:
        missing = [c for c in requested if c not in found]
        if missing:
            raise UsageError(f'no category {", ".join(missing)} (with train/good/) in {data_path}; '
                                           f'found: {", ".join(found) or "none"}')
        return requested
    if not found:
        raise UsageError(f'no category folders with train/good/ in {data_path}')
    return found


def main(argv=None):
    args = parse_args(argv)
    categories = find_categories(args.data_path, args.category)
    spec = cli.detector_from_args(args).spec
    logger.info('evaluating %s on %s with %s', ', '.join(categories), args.data_path, spec.name)
    os.makedirs(args.save_path, exist_ok=True)
    rows = []
    for category in categories:
        row, *outcome = evaluate_category(os.path.join(args.data_path, category), args)
        save_category_figures(args.save_path, row, *outcome)
        rows.append(row)
        logger.info('%s: image AUROC %.4f', category, row['image_auroc'])
    rows.append(mean_row(rows))
    write_results(args.save_path, rows)
    print(format_table(rows))
    logger.info('wrote %s and %s', os.path.join(args.save_path, 'metrics.csv'),
                os.path.join(args.save_path, 'metrics.json'))
    return rows


if __name__ == '__main__':
    sys.exit(cli.run_cli(main, 'evaluate.py'))
