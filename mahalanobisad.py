"""MahalanobisAD: industrial anomaly detection on pretrained EfficientNet features.

Fit a Gaussian per network level on good images (train/), score test images by their summed
Mahalanobis distance, decide the verdict with a threshold derived from labelled images
(images/ + gt_masks/), and draw a four-panel figure per image.

    python3 mahalanobisad.py                              # bundled sample data
    python3 mahalanobisad.py --input IMG --savepath OUT   # one image -> OUT figure
"""
import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import anomaly_model
import image_utils
import model_utils
import plot_utils
from anomaly_model import FeatureFileError, MethodError
from image_utils import ImageError
from model_utils import ModelError

logger = logging.getLogger('mahalanobisad')

DEFAULT_INPUT = 'images'
DEFAULT_SINGLE_SAVEPATH = 'output.png'
DEFAULT_MULTI_SAVEPATH = 'output'
# Settings that change the features themselves: a feature file fitted with others cannot be used.
FEATURE_SETTINGS = ('backbone', 'input_size', 'resize_size', 'mean', 'std', 'feature_names', 'method')
# Settings of the fit: a default-named feature file fitted with others is not silently reused.
FIT_SETTINGS = ('train_dir', 'aug', 'aug_num', 'seed', 'method_options')


class UsageError(ValueError):
    """Arguments that cannot work together; the message says what to change."""


class OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text}')
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be a non-negative integer, got {text}')
    return value


def pixel_count(text):
    value = int(text)
    if not 1 <= value <= image_utils.OPENCV_MAX_PIXELS:
        raise argparse.ArgumentTypeError(f'must be in 1..{image_utils.OPENCV_MAX_PIXELS} (OpenCV\'s own limit), '
                                         f'got {text}')
    return value


def output_file(text):
    """A file the tool will write: not an existing directory, its name within the file system's limit."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f'{text} is a directory, a file name is needed')
    limit = model_utils.name_limit(os.path.dirname(os.path.abspath(text)))
    if len(os.fsencode(os.path.basename(text))) > limit:
        raise argparse.ArgumentTypeError(f'file name longer than the file system\'s limit of {limit} bytes: {text}')
    return text


def output_path(text):
    """A file or folder the tool will write: its name within the file system's limit."""
    limit = model_utils.name_limit(os.path.dirname(os.path.abspath(text)))
    if len(os.fsencode(os.path.basename(os.path.normpath(text)))) > limit:
        raise argparse.ArgumentTypeError(f'name longer than the file system\'s limit of {limit} bytes: {text}')
    return text


def existing_dir(text):
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f'no such directory: {text}')
    return text


def unit_fraction(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f'must be in (0, 1], got {text}')
    return value


def finite_float(text):
    value = float(text)
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f'must be a finite number, got {text}')
    return value


def add_model_arguments(p):
    """Backbone, method and fitting flags, shared with evaluate.py."""
    p.add_argument('-m', '--model', default=model_utils.DEFAULT_MODEL,
                   help=f'backbone: {", ".join(model_utils.MODEL_CATALOGUE)} (b0..b7 are downloaded on first use) '
                        'or a path to an .onnx feature extractor')
    p.add_argument('--method', choices=list(anomaly_model.METHODS), default='mahalanobis',
                   help='mahalanobis (pooled features, MahalanobisAD), padim, spade or patchcore')
    p.add_argument('--padim_dims', type=positive_int, default=200, help='padim: channels kept (random, seeded)')
    p.add_argument('--spade_k', type=positive_int, default=50, help='spade: nearest training images')
    p.add_argument('--coreset_ratio', type=unit_fraction, default=0.1,
                   help='patchcore: fraction of training patches kept in the memory bank')
    p.add_argument('-a', '--aug', action='store_true', help='fit on augmented copies too (rotation, crop)')
    p.add_argument('-an', '--aug_num', type=positive_int, default=5, help='augmented copies per training image')
    p.add_argument('-bs', '--batch_size', type=positive_int, default=16, help='images per backbone run')
    p.add_argument('--seed', type=non_negative_int, default=0,
                   help='seed of augmentation, channel subsets, coresets and folds')
    p.add_argument('--max_pixels', type=pixel_count, default=image_utils.DEFAULT_MAX_PIXELS,
                   help='larger images (width x height, read from the file header) are refused before decoding')
    p.add_argument('--model_dir', type=output_path, default='models', help='cache of ONNX backbones')
    p.add_argument('--model_url', default=None,
                   help=f'base URL of b0..b7 downloads (default ${model_utils.MODEL_URL_ENV}, '
                        f'else {model_utils.DEFAULT_MODEL_URL})')


def parse_args(argv=None):
    p = OneLineArgumentParser(prog='mahalanobisad.py', description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('-i', '--input', nargs='+', default=[DEFAULT_INPUT],
                   help='image files or directories (searched recursively) to score')
    p.add_argument('-s', '--savepath', type=output_path, default=None,
                   help=f'figure file for one input (default {DEFAULT_SINGLE_SAVEPATH}); '
                        f'directory for several (default {DEFAULT_MULTI_SAVEPATH}/)')
    p.add_argument('-f', '--feat', type=output_file, default=None,
                   help='feature file of fitted statistics, reused if it exists '
                        '(default <train_dir name>.pkl, <train_dir name>_<method>.pkl for other methods)')
    p.add_argument('-tr', '--train_dir', default='train', help='directory of good training images')
    p.add_argument('-th', '--threshold', type=finite_float, default=None,
                   help='image score threshold; overrides the one derived from --test_dir/--gt_dir')
    p.add_argument('--test_dir', type=existing_dir, default=None,
                   help='labelled images for the threshold (default images, if present)')
    p.add_argument('--gt_dir', type=existing_dir, default=None,
                   help='masks of --test_dir images (default gt_masks); an image without one is normal')
    p.add_argument('--no_figures', action='store_true', help='write no figures')
    p.add_argument('--json', type=output_file, default=None, metavar='PATH', help='write scores and verdicts as JSON')
    add_model_arguments(p)
    return p.parse_args(argv)


@dataclasses.dataclass
class ScoredImage:
    """One scored image: the network's view (S, S, 3) uint8, its image score, its pixel
    distance map (S, S) or None, and its ground-truth mask (S, S) bool or None."""
    path: str
    score: float
    view: np.ndarray
    anomaly_map: np.ndarray = None
    gt_mask: np.ndarray = None


def pixel_arrays(scored):
    """Ground truth and maps of scored images, stacked: (masks (N, S, S) bool, maps (N, S, S)); an
    image without a mask counts as defect-free."""
    masks = np.stack([s.gt_mask if s.gt_mask is not None else np.zeros(s.view.shape[:2], bool) for s in scored])
    return masks, np.stack([s.anomaly_map for s in scored])


# ----------------------------------------------------------------------------------------------
# image -> tensor -> features
# ----------------------------------------------------------------------------------------------

def fit(method, train_paths, extractor, spec, batch_size=16, aug_num=0, seed=0):
    """Configure and fit `method` on the training images (plus aug_num augmented views of each)
    -> holdout thresholds {'image', 'pixel'} (pixel None for a method without maps)."""
    copies = 1 + aug_num

    def load(item):
        """All views of one training image (decoded once): the plain one, then the augmented ones."""
        index, path = item
        if copies == 1:
            return [image_utils.to_tensor(image_utils.load_view(path, spec.resize_size, spec.input_size)[0],
                                          spec.mean, spec.std)]
        image = image_utils.load_image(path)
        views = [image_utils.network_view(image, spec.resize_size, spec.input_size)]
        for copy in range(1, copies):  # seeded per (image, copy): the same views whatever the thread order
            rng = np.random.default_rng([seed, index, copy])
            views.append(image_utils.augment(image, rng, spec.resize_size, spec.input_size))
        return [image_utils.to_tensor(view, spec.mean, spec.std) for view in views]

    batches, groups = [], []
    items = list(enumerate(train_paths))
    with tqdm(total=len(items), desc='fit: features', unit='img') as progress, threadpool_limits(1, 'blas'):
        for batch in image_utils.stream(items, load, batch_size):
            progress.update(len(batch))
            tensors = []
            for (index, _), loaded in batch:
                if isinstance(loaded, ImageError):
                    logger.warning('skipping training image: %s', loaded)
                    continue
                tensors += loaded
                groups += [index] * len(loaded)
            for start in range(0, len(tensors), batch_size):
                feature_maps = extractor(np.stack(tensors[start:start + batch_size]))
                if not batches:
                    configure(method, feature_maps, spec)
                batches.append(method.features(feature_maps))
    if len(set(groups)) < 2:
        raise UsageError(f'need at least 2 readable training images, found {len(set(groups))}')
    train_features = anomaly_model.concatenate_features(batches)
    logger.info('fitting %s on %d views of %d images', method.name, len(groups), len(set(groups)))
    method.fit(train_features)
    image_scores, pixel_max = anomaly_model.holdout_scores(method, train_features, np.array(groups),
                                                           spec.input_size, seed=seed)
    return {'image': float(image_scores.max()), 'pixel': pixel_max}


def configure(method, feature_maps, spec):
    """Fit `method` to this backbone's outputs; warn once if it cannot draw maps."""
    method.configure([m.shape[1:] for m in feature_maps], spec.input_size)
    if not method.localizes:
        sizes = ', '.join(f'{m.shape[-1]}x{m.shape[-2]}' for m in feature_maps)
        logger.warning('%s has no feature maps of stride 4..16 (its outputs are %s): image-level scores only, '
                       'no heat maps', spec.name, sizes)


def score_images(paths, extractor, spec, method, batch_size=16, masks_from=None, desc='score'):
    """Yield, for each of `paths` in order, its ScoredImage, or None if it cannot be read (with a
    warning). masks_from: (test_dir, gt_dir) to attach ground-truth masks, or None."""
    def load(path):
        view, image_shape = image_utils.load_view(path, spec.resize_size, spec.input_size)
        gt_mask = None
        if masks_from is not None:
            mask_path = image_utils.find_mask(path, *masks_from)
            if mask_path is not None:
                try:
                    gt_mask = image_utils.load_mask(mask_path, image_shape)
                except ImageError as e:  # broken ground truth would bias the threshold: stop
                    raise UsageError(f'ground truth unusable: {e}') from None
                gt_mask = image_utils.mask_view(gt_mask, spec.resize_size, spec.input_size)
        return view, gt_mask

    # Scoring arithmetic stays on this thread: BLAS helper threads would compete with the decoders.
    with tqdm(total=len(paths), desc=desc, unit='img', leave=False) as progress, threadpool_limits(1, 'blas'):
        for batch in image_utils.stream(paths, load, batch_size):
            progress.update(len(batch))
            good = [(path, *loaded) for path, loaded in batch if not isinstance(loaded, ImageError)]
            scored = {}
            if good:
                feature_maps = extractor(np.stack([image_utils.to_tensor(view, spec.mean, spec.std)
                                                   for _, view, _ in good]))
                scores, maps = method.score(method.features(feature_maps), spec.input_size)
                if maps is None:
                    maps = [None] * len(good)
                scored = {path: ScoredImage(path, float(score), view, anomaly_map, gt_mask)
                          for (path, view, gt_mask), score, anomaly_map in zip(good, scores, maps)}
            for path, loaded in batch:
                if isinstance(loaded, ImageError):
                    logger.warning('skipping: %s', loaded)
                yield scored.get(path)


# ----------------------------------------------------------------------------------------------
# feature file: reuse or fit
# ----------------------------------------------------------------------------------------------

def load_or_fit(extractor, spec, args):
    """-> (meta, fitted method): reused from the feature file if it exists, else fitted and saved."""
    method = anomaly_model.make_method(args.method, args.padim_dims, args.spade_k, args.coreset_ratio, args.seed)
    suffix = '' if args.method == 'mahalanobis' else '_' + args.method
    feat_path = args.feat or os.path.basename(os.path.normpath(args.train_dir)) + suffix + '.pkl'
    settings = {'backbone': spec.name, 'input_size': spec.input_size, 'resize_size': spec.resize_size,
                'mean': list(spec.mean), 'std': list(spec.std), 'feature_names': extractor.output_names,
                'method': method.name, 'method_options': dict(method.params),
                'train_dir': os.path.abspath(args.train_dir), 'aug': args.aug,
                'aug_num': args.aug_num if args.aug else 0, 'seed': args.seed}
    if os.path.exists(feat_path):
        meta, method = anomaly_model.load_feature_file(feat_path)
        check_settings(feat_path, meta, settings, FEATURE_SETTINGS, 'cannot be used with this backbone and method')
        if args.feat is None:
            check_settings(feat_path, meta, settings, FIT_SETTINGS, 'was fitted differently')
        logger.info('reusing fitted %s statistics from %s (%d training images; train images not read)',
                    method.name, feat_path, meta['n_train_images'])
        return meta, method

    train_paths = image_utils.list_images(args.train_dir)
    logger.info('fitting %s on %d training images from %s%s', method.name, len(train_paths), args.train_dir,
                f' with {args.aug_num} augmented copies each' if args.aug else '')
    holdout_thresholds = fit(method, train_paths, extractor, spec, args.batch_size, settings['aug_num'], args.seed)
    meta = dict(settings, n_train_images=len(train_paths), holdout_thresholds=holdout_thresholds)
    anomaly_model.save_feature_file(feat_path, meta, method)
    logger.info('saved fitted statistics to %s', feat_path)
    return meta, method


def check_settings(feat_path, meta, settings, keys, what):
    differences = [f'{k} {meta.get(k)!r} here {settings[k]!r}' for k in keys if meta.get(k) != settings[k]]
    if differences:
        hint = ('pass --feat with a new file name to fit one' if keys is FEATURE_SETTINGS
                else 'pass --feat to reuse it anyway, or another --feat to fit a new one')
        raise FeatureFileError(f'{feat_path} {what}: {"; ".join(differences)}; {hint}')


# ----------------------------------------------------------------------------------------------
# thresholds
# ----------------------------------------------------------------------------------------------

def labelled_dirs(args):
    """(test_dir, gt_dir) of the labelled images, or None where there are none."""
    test_dir, gt_dir = args.test_dir or 'images', args.gt_dir or 'gt_masks'
    for explicit in (args.test_dir, args.gt_dir):
        if explicit and not os.path.isdir(explicit):
            raise UsageError(f'no such directory: {explicit}')
    if os.path.isdir(test_dir) and os.path.isdir(gt_dir):
        return test_dir, gt_dir
    logger.info('no labelled images (%s + %s)', test_dir, gt_dir)
    return None


def decide_thresholds(extractor, spec, method, meta, args, masks_from):
    """-> (threshold, pixel_threshold, source, {realpath: ScoredImage} of the labelled images).

    --threshold given: nothing is scored, the pixel threshold comes from the training hold-out.
    Else the labelled images (masks_from) are scored for F1-optimal thresholds, falling back to
    the training hold-out when they lack a class.
    """
    labelled = {}
    image_threshold = pixel_threshold = None
    source = 'training hold-out'
    if args.threshold is not None:
        image_threshold, source = args.threshold, '--threshold'
        logger.info('image threshold %.3f from --threshold', image_threshold)
    elif masks_from is not None:
        test_dir, gt_dir = masks_from
        paths = image_utils.list_images(test_dir)
        scored = [s for s in score_images(paths, extractor, spec, method, args.batch_size,
                                          masks_from=masks_from, desc='threshold: labelled images') if s]
        labelled = {os.path.realpath(s.path): s for s in scored}
        labels = np.array([s.gt_mask is not None and s.gt_mask.any() for s in scored])
        if labels.any() and not labels.all():
            image_threshold, f1 = anomaly_model.f1_optimal_threshold(labels, [s.score for s in scored])
            source = f'F1-optimal on {test_dir} + {gt_dir}'
            logger.info('image threshold %.3f maximises F1 (%.3f) on %d labelled images (%d anomalous)',
                        image_threshold, f1, len(scored), labels.sum())
            if method.localizes:
                pixel_threshold, pixel_f1 = anomaly_model.f1_optimal_threshold(*pixel_arrays(scored))
                logger.info('pixel threshold %.3f maximises pixel F1 (%.3f)', pixel_threshold, pixel_f1)
        else:
            logger.warning('%s has %s: cannot derive an F1-optimal threshold', test_dir,
                           'no defect masks in ' + gt_dir if not labels.any() else 'no normal images')
    if image_threshold is None:
        image_threshold = meta['holdout_thresholds']['image']
        logger.info('image threshold %.3f: the largest score of held-out training images', image_threshold)
    if pixel_threshold is None and method.localizes:
        pixel_threshold = meta['holdout_thresholds']['pixel']
        logger.info('pixel threshold %.3f: the largest pixel score of held-out training images', pixel_threshold)
    return image_threshold, pixel_threshold, source, labelled


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def list_inputs(inputs):
    """[(path, name)] of the images to score; name is the path relative to the directory given
    (separators as '_'), or the file name for a file given directly."""
    listed = []
    for given in inputs:
        for path in image_utils.list_images(given):
            relative = os.path.relpath(path, given) if os.path.isdir(given) else os.path.basename(path)
            listed.append((path, os.path.splitext(relative)[0].replace(os.sep, '_')))
    return listed


def report_images(inputs, labelled, fresh, threshold, pixel_threshold, args, figures):
    """Verdict, log line and figure (queued on the FigureWriter `figures`) for each input
    -> JSON records [{path, score, anomaly}]."""
    results = []
    for path, name in inputs:
        scored = labelled.get(os.path.realpath(path)) or next(fresh)
        if scored is None:
            continue
        anomalous = scored.score >= threshold
        shown = image_utils.display_path(path)  # valid UTF-8 whatever bytes the name holds
        results.append({'path': shown, 'score': scored.score, 'anomaly': bool(anomalous)})
        figure = None
        if not args.no_figures:  # a name derived from a long input name is shortened to fit
            figure = (args.savepath or DEFAULT_SINGLE_SAVEPATH if len(inputs) == 1
                      else model_utils.fit_path(os.path.join(args.savepath or DEFAULT_MULTI_SAVEPATH, name + '.png')))
            figures.submit(figure, scored.view, scored.gt_mask, scored.anomaly_map,
                           scored.score, threshold, pixel_threshold, title=shown)
        logger.info('%s : score %.3f threshold %.3f -> %s%s', shown, scored.score, threshold,
                    'ANOMALY' if anomalous else 'normal', f'  [{image_utils.display_path(figure)}]' if figure else '')
    return results


def main(argv=None):
    args = parse_args(argv)

    spec, onnx_path = model_utils.resolve_model(args.model, args.model_dir, args.model_url)
    extractor = model_utils.FeatureExtractor(onnx_path)
    logger.info('model %s (%s, input %dx%d, %d feature levels)', spec.name, onnx_path,
                spec.input_size, spec.input_size, len(extractor.output_names))

    inputs = list_inputs(args.input)
    if len(inputs) > 1 and args.savepath and image_utils.is_image_file(args.savepath):
        raise UsageError(f'{len(inputs)} inputs: --savepath must be a directory, not {args.savepath}')

    meta, method = load_or_fit(extractor, spec, args)
    masks_from = labelled_dirs(args)
    threshold, pixel_threshold, threshold_source, labelled = decide_thresholds(
        extractor, spec, method, meta, args, masks_from)

    logger.info('scoring %d images (threshold %.3f from %s)', len(inputs), threshold, threshold_source)
    fresh = score_images([p for p, _ in inputs if os.path.realpath(p) not in labelled],
                         extractor, spec, method, args.batch_size, masks_from)
    with contextlib.closing(fresh), plot_utils.FigureWriter() as figures:
        results = report_images(inputs, labelled, fresh, threshold, pixel_threshold, args, figures)
    if not results:
        raise ImageError('none of the input images could be read')
    logger.info('%d of %d images anomalous', sum(r['anomaly'] for r in results), len(results))
    if args.json:
        report = {'model': spec.name, 'threshold': threshold, 'threshold_source': threshold_source,
                  'pixel_threshold': pixel_threshold, 'images': results}
        model_utils.atomic_write_bytes(args.json, json.dumps(report, indent=1).encode())
        logger.info('wrote %s', args.json)
    return results


TRACEBACK_ENV = 'MAHALANOBISAD_TRACEBACK'


def run_cli(main, prog, argv=None):
    """Run `main(argv)` as a command: the tool's errors as one line on stderr and exit code 1
    (argparse's exit code 2 for bad flags), Ctrl-C as one 'interrupted' line and exit code 130
    (outputs are written atomically, so none is left half-written), progress bars kept apart from
    log lines. Anything unexpected is one line too; $MAHALANOBISAD_TRACEBACK=1 shows where it arose."""
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
    try:
        with logging_redirect_tqdm():
            main(argv)
    except (ModelError, ImageError, FeatureFileError, UsageError, MethodError, OSError) as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f'{prog}: interrupted', file=sys.stderr)
        return 130
    except MemoryError:
        print(f'{prog}: error: out of memory', file=sys.stderr)
        return 1
    except Exception as e:  # a library's exception this tool failed to translate: still one line
        if os.environ.get(TRACEBACK_ENV):
            raise
        message = str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''
        print(f'{prog}: error: unexpected {type(e).__name__}: {message} (run with {TRACEBACK_ENV}=1 for '
              'the traceback, and please report it)', file=sys.stderr)
        return 1
    return 0


def run(argv=None):
    return run_cli(main, 'mahalanobisad.py', argv)


if __name__ == '__main__':
    sys.exit(run())
