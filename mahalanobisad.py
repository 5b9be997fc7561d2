"""MahalanobisAD: industrial anomaly detection on pretrained EfficientNet features.

Fit a Gaussian per network level on good images (train/), score test images by their summed
Mahalanobis distance, decide the verdict with a threshold derived from labelled images
(images/ + gt_masks/, once: stored in the feature file), and draw a four-panel figure per image.

    python3 mahalanobisad.py                              # bundled sample data
    python3 mahalanobisad.py --input IMG --savepath OUT   # one image -> OUT figure
    python3 mahalanobisad.py -v line.mp4 --json f.jsonl  # video file, image sequence or camera (live.py)
    python3 mahalanobisad.py --watch incoming/            # every image dropped into a folder (live.py)
"""
import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import time

import numpy as np
from tqdm.contrib.logging import logging_redirect_tqdm

import anomaly_model
import image_utils
import live
import model_utils
import onnxruntime
import plot_utils
from anomaly_model import FeatureFileError, MethodError
from detector import (FIT_SETTINGS, HOLDOUT_SOURCE, Detector, Inspection, StageTimer,  # noqa: F401 (the API)
                      UsageError, check_contamination, check_settings, labelled_set_fingerprint)
from image_utils import ImageError
from model_utils import ModelError

logger = logging.getLogger('mahalanobisad')

DEFAULT_INPUT = 'images'
DEFAULT_SINGLE_SAVEPATH = 'output.png'
DEFAULT_MULTI_SAVEPATH = 'output'
DEFAULT_VIDEO_SAVEPATH = 'output.mp4'
CALIBRATION_RULE = 'F1-optimal'  # recorded with stored thresholds: another rule means recalibrating


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
    return output_path(text)


def output_path(text):
    """A file or folder the tool will write: its name within the file system's limit."""
    limit = model_utils.name_limit(os.path.dirname(os.path.abspath(text)))
    if len(os.fsencode(os.path.basename(os.path.normpath(text)))) > limit:
        raise argparse.ArgumentTypeError(f'name longer than the file system\'s limit of {limit} bytes: {text}')
    return text


def output_dir(text):
    """A folder the tool will write into: not an existing file, its name within the file system's limit."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f'{text} is a file, a folder is needed')
    return output_path(text)


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


def open_fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f'must be in (0, 1), got {text}')
    return value


def contamination_value(text):
    try:
        return check_contamination(text if text == 'auto' else float(text))
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_holdout_arguments(p):
    """Flags on the training hold-out (threshold for a false-positive rate, contaminated training
    folders), shared with evaluate.py."""
    p.add_argument('--fpr', type=open_fraction, default=None, metavar='ALPHA',
                   help='image (and pixel) thresholds that flag a new normal image with probability at most ALPHA, '
                        'from held-out training scores; wins over labelled images')
    p.add_argument('--contamination', type=contamination_value, default=None, metavar='auto|FRACTION',
                   help='leave out training images that look defective: auto (robust outlier rule) or that share')


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
    p.add_argument('-e', '--env_id', type=int, default=None,
                   help='run the backbone on execution provider N of --env_list (default: the CPU provider)')
    p.add_argument('--model_dir', type=output_dir, default='models', help='cache of ONNX backbones')
    p.add_argument('--model_url', default=None,
                   help=f'base URL of b0..b7 downloads (default ${model_utils.MODEL_URL_ENV}, '
                        f'else {model_utils.DEFAULT_MODEL_URL})')


def parse_args(argv=None):
    p = OneLineArgumentParser(prog='mahalanobisad.py', description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('-i', '--input', nargs='+', default=None,
                   help=f'image files or directories (searched recursively) to score (default {DEFAULT_INPUT}; '
                        'none with --export)')
    p.add_argument('-v', '--video', default=None, metavar='SRC',
                   help='score a video file, an image-sequence pattern (frames/%%04d.png) or a camera index (0)')
    p.add_argument('--realtime', action='store_true',
                   help='with -v: never fall behind the source, score the newest frame (always on for a camera)')
    p.add_argument('--watch', type=existing_dir, default=None, metavar='DIR',
                   help='score every image in DIR, then each new one once completely written, until Ctrl-C')
    p.add_argument('-s', '--savepath', type=output_path, default=None,
                   help=f'figure file for one input (default {DEFAULT_SINGLE_SAVEPATH}); directory for several or '
                        f'--watch (default {DEFAULT_MULTI_SAVEPATH}/); annotated video for -v '
                        f'(default {DEFAULT_VIDEO_SAVEPATH})')
    p.add_argument('-f', '--feat', type=output_file, default=None,
                   help='feature file of fitted statistics, reused if it exists '
                        '(default <train_dir name>.pkl, <train_dir name>_<method>.pkl for other methods)')
    p.add_argument('-tr', '--train_dir', default='train', help='directory of good training images')
    p.add_argument('-th', '--threshold', type=finite_float, default=None,
                   help='image score threshold; overrides the one derived from --test_dir/--gt_dir')
    p.add_argument('--recalibrate', action='store_true',
                   help='derive the thresholds from --test_dir/--gt_dir again, even if the feature file '
                        'holds thresholds for the same labelled set')
    p.add_argument('--test_dir', type=existing_dir, default=None,
                   help='labelled images for the threshold (default images, if present)')
    p.add_argument('--gt_dir', type=existing_dir, default=None,
                   help='masks of --test_dir images (default gt_masks); an image without one is normal')
    p.add_argument('--no_figures', action='store_true', help='write no figures')
    p.add_argument('--json', type=output_file, default=None, metavar='PATH',
                   help='write scores and verdicts as JSON (JSON Lines, one line per frame or file, with -v/--watch)')
    add_holdout_arguments(p)
    p.add_argument('--export', type=output_file, default=None, metavar='PATH',
                   help='write the fitted detector with its thresholds as one ONNX model (pixels in; score, map, '
                        'verdict out); scores nothing unless -i or -v is given')
    p.add_argument('--export_size', type=positive_int, nargs=2, default=None, metavar=('W', 'H'),
                   help='image size the exported model takes (default: the training images\' size)')
    p.add_argument('-b', '--benchmark', action='store_true',
                   help='time the image inputs: per-stage and end-to-end milliseconds per image')
    p.add_argument('-bc', '--benchmark_count', type=positive_int, default=5, help='runs of --benchmark')
    p.add_argument('--env_list', action='store_true', help='list the onnxruntime execution providers and exit')
    add_model_arguments(p)
    args = p.parse_args(argv)
    if sum(x is not None for x in (args.input, args.video, args.watch)) > 1:
        p.error('give one of -i/--input, -v/--video, --watch')
    if args.realtime and args.video is None:
        p.error('--realtime needs -v/--video')
    if args.benchmark and (args.video is not None or args.watch is not None):
        p.error('-b/--benchmark times image inputs (-i)')
    return args


# ----------------------------------------------------------------------------------------------
# feature file: reuse or fit
# ----------------------------------------------------------------------------------------------

def feature_file_path(args):
    """--feat, or <train_dir name>.pkl (<train_dir name>_<method>.pkl for methods other than mahalanobis)."""
    suffix = '' if args.method == 'mahalanobis' else '_' + args.method
    return args.feat or os.path.basename(os.path.normpath(args.train_dir)) + suffix + '.pkl'


def load_or_fit(detector, args):
    """`detector` (unfitted, with the CLI's flags) -> a fitted Detector: reused from the feature file if
    it exists, else fitted and saved."""
    feat_path = feature_file_path(args)
    if os.path.exists(feat_path):
        fitted = Detector.load(feat_path, model=args.model, method=args.method, model_dir=args.model_dir,
                               model_url=args.model_url, batch_size=args.batch_size, max_pixels=args.max_pixels,
                               provider=detector.provider)
        if args.feat is None:
            wanted = dict(detector.settings(), train_dir=os.path.abspath(args.train_dir))
            check_settings(feat_path, fitted.meta_, wanted, FIT_SETTINGS, 'was fitted differently',
                           'pass --feat to reuse it anyway, or another --feat to fit a new one')
        logger.info('reusing fitted %s statistics from %s (%d training images; train images not read)',
                    fitted.method, feat_path, fitted.meta_['n_train_images'])
        return fitted

    train_paths = image_utils.list_images(args.train_dir)
    logger.info('fitting %s on %d training images from %s%s', args.method, len(train_paths), args.train_dir,
                f' with {args.aug_num} augmented copies each' if args.aug else '')
    detector.fit(train_paths, source=os.path.abspath(args.train_dir)).save(feat_path)
    logger.info('saved fitted statistics to %s', feat_path)
    return detector


def execution_provider(env_id):
    """-e N -> the name of onnxruntime execution provider N (None: the default, CPU)."""
    if env_id is None:
        return None
    providers = onnxruntime.get_available_providers()
    if not 0 <= env_id < len(providers):
        raise UsageError(f'no execution provider {env_id}: --env_list shows 0..{len(providers) - 1}')
    return providers[env_id]


def detector_from_args(args):
    """An unfitted Detector with the CLI's model and method flags."""
    return Detector(model=args.model, method=args.method, model_dir=args.model_dir, seed=args.seed,
                    batch_size=args.batch_size, model_url=args.model_url, padim_dims=args.padim_dims,
                    spade_k=args.spade_k, coreset_ratio=args.coreset_ratio,
                    aug_num=args.aug_num if args.aug else 0, contamination=args.contamination,
                    max_pixels=args.max_pixels, provider=execution_provider(args.env_id))


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


def decide_thresholds(detector, args, masks_from, feat_path):
    """Set the detector's thresholds -> {realpath: Inspection} of the labelled images scored for them.

    --threshold given: nothing is scored, the pixel threshold comes from the training hold-out.
    --fpr given: both from the training hold-out for that false-positive rate (labelled images unused).
    Thresholds stored in the feature file for the same labelled set (masks_from: same files, sizes,
    modification times, same rule) are reused and nothing is scored; without labelled images, stored
    ones are reused too (hold-out ones are recomputed). Else, or with --recalibrate, the labelled
    images are scored for F1-optimal thresholds (the training hold-out when they lack a class),
    which are then stored in the feature file.
    """
    if args.threshold is not None:
        detector.set_threshold(args.threshold, '--threshold').use_holdout_thresholds(image=False)
        return {}
    if args.fpr is not None or masks_from is None:
        if args.fpr is not None and masks_from is not None:
            logger.info('--fpr %g: thresholds from the training hold-out, not from %s', args.fpr, masks_from[0])
        if args.fpr is None and not args.recalibrate and not detector.threshold_source_.startswith(HOLDOUT_SOURCE):
            detector.use_stored_thresholds(None)  # a decision stored without labelled images to check it against
        else:  # a rule: recomputed
            detector.use_holdout_thresholds(fpr=args.fpr)
        return {}
    test_dir, gt_dir = masks_from
    paths = image_utils.list_images(test_dir)
    masks = [image_utils.find_mask(p, test_dir, gt_dir) for p in paths]
    fingerprint = labelled_set_fingerprint(paths, masks, rule=CALIBRATION_RULE)
    if args.recalibrate:
        logger.info('--recalibrate: deriving the thresholds from %s + %s again', test_dir, gt_dir)
    elif detector.use_stored_thresholds(fingerprint):
        return {}
    results = [r for r in detector.inspect(paths, masks, desc='threshold: labelled images') if not r.error]
    detector.calibrate_results(results, source=f'{test_dir} + {gt_dir}', fingerprint=fingerprint)
    try:
        detector.save(feat_path)
        logger.info('stored the thresholds in %s: later runs with this labelled set reuse them', feat_path)
    except OSError as e:  # the run can go on; the next one calibrates again
        logger.warning('cannot store the thresholds in %s: %s', feat_path, e)
    return {os.path.realpath(r.path): r for r in results}


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def list_inputs(inputs):
    """[(path, name)] of the images to score; name is the path relative to the directory given
    (separators as '_'), or the file name for a file given directly."""
    listed = []
    for given in inputs:
        for path in image_utils.list_images(given):
            listed.append((path, image_utils.flat_name(path, given) if os.path.isdir(given)
                           else os.path.splitext(os.path.basename(path))[0]))
    return listed


def report_images(inputs, labelled, fresh, detector, args, figures):
    """Verdict, log line and figure (queued on the FigureWriter `figures`) for each input
    -> JSON records [{path, score, anomaly}]. labelled: {realpath: Inspection} already scored;
    fresh: the Inspections of the other inputs, in order."""
    results = []
    for path, name in inputs:
        inspected = labelled.get(os.path.realpath(path)) or next(fresh)
        if inspected.error:
            if len(inputs) == 1:  # a single input that cannot be used: its reason is the error
                raise ImageError(inspected.error)
            continue
        figure = None
        if not args.no_figures:  # a name derived from a long input name is shortened to fit
            figure = (args.savepath or DEFAULT_SINGLE_SAVEPATH if len(inputs) == 1
                      else model_utils.fit_path(os.path.join(args.savepath or DEFAULT_MULTI_SAVEPATH, name + '.png')))
        # The threshold may have changed since the labelled images were inspected: the verdict is recomputed.
        results.append(live.report_image(detector, path, inspected, inspected.score >= detector.threshold_,
                                         figure, figures))
    return results


def score_images(detector, inputs, labelled, masks_from, args):
    """Image mode: verdicts, figures and the JSON report of `inputs` -> JSON records."""
    logger.info('scoring %d images (threshold %.3f from %s)', len(inputs), detector.threshold_,
                detector.threshold_source_)
    fresh_paths = [p for p, _ in inputs if os.path.realpath(p) not in labelled]
    masks = ([image_utils.find_mask(p, *masks_from) for p in fresh_paths] if masks_from is not None else None)
    fresh = detector.inspect(fresh_paths, masks)
    with contextlib.closing(fresh), plot_utils.FigureWriter() as figures:
        results = report_images(inputs, labelled, fresh, detector, args, figures)
    if not results:
        raise ImageError(f'none of the {len(inputs)} input images could be read')
    logger.info('%d of %d images anomalous', sum(r['anomaly'] for r in results), len(results))
    if args.json:
        report = {'model': detector.spec.name, 'threshold': detector.threshold_,
                  'threshold_source': image_utils.display_path(detector.threshold_source_),
                  'pixel_threshold': detector.pixel_threshold_, 'target_fpr': detector.target_fpr_,
                  'n_holdout': len(detector.meta_['holdout_scores']),
                  'excluded_train_images': detector.meta_.get('excluded_train_images', []), 'images': results}
        model_utils.atomic_write_bytes(args.json, json.dumps(report, indent=1).encode())
        logger.info('wrote %s', args.json)
    return results


BENCHMARK_STAGES = ('decode', 'backbone', 'scoring', 'figure', 'end to end')


def benchmark(detector, paths, args):
    """-b: score `paths` --benchmark_count times, as the ailia sample's benchmark -> [{stage: ms per image}]
    per run, printed as min / median / max. decode is summed over the decoding threads (it overlaps
    the backbone, so the stages do not add up to end to end); figure renders on this thread, writes nothing."""
    runs = []
    for run in range(args.benchmark_count):
        timer = StageTimer()
        start = time.perf_counter()
        for result in detector.inspect(paths, desc=f'benchmark run {run + 1}', timer=timer):
            if not args.no_figures and result.error is None:
                with timer('figure'):
                    detector.render_figure(result)
        timer.seconds['end to end'] = time.perf_counter() - start
        runs.append({stage: 1000 * seconds / len(paths) for stage, seconds in timer.seconds.items()})
        logger.info('benchmark run %d: %.1f ms per image end to end', run + 1, runs[-1]['end to end'])
    print(f'{"ms per image":<12} {"min":>8} {"median":>8} {"max":>8}   ({len(paths)} images, {len(runs)} runs)')
    for stage in (s for s in BENCHMARK_STAGES if s in runs[0]):
        values = [r[stage] for r in runs]
        print(f'{stage:<12} {min(values):8.2f} {statistics.median(values):8.2f} {max(values):8.2f}')
    return runs


def list_providers():
    """--env_list: the onnxruntime execution providers here, numbered for -e."""
    providers = onnxruntime.get_available_providers()
    for i, name in enumerate(providers):
        print(f'{i}: {name}{"  (default)" if name == "CPUExecutionProvider" else ""}')
    return providers


def main(argv=None):
    args = parse_args(argv)
    if args.env_list:
        return list_providers()
    if args.threshold is not None and args.fpr is not None:
        raise UsageError('--threshold and --fpr both set the image threshold: give one of them')
    if args.export_size and not args.export:
        raise UsageError('--export_size needs --export PATH')
    detector = detector_from_args(args)
    detector.spec  # opens (or downloads) the backbone first: a bad -m fails before any other work
    image_mode = args.video is None and args.watch is None
    export_only = args.export is not None and args.input is None and image_mode
    inputs = list_inputs(args.input or [DEFAULT_INPUT]) if image_mode and not export_only else None
    if inputs and len(inputs) > 1 and args.savepath and image_utils.is_image_file(args.savepath):
        raise UsageError(f'{len(inputs)} inputs: --savepath must be a directory, not {args.savepath}')

    detector = load_or_fit(detector, args)
    masks_from = labelled_dirs(args)
    labelled = decide_thresholds(detector, args, masks_from, feature_file_path(args))
    if args.export:
        detector.export(args.export, args.export_size)
        if export_only:
            return []

    if args.video is not None:
        return live.inspect_video(detector, args.video, realtime=args.realtime, json_path=args.json,
                                  savepath=None if args.no_figures else args.savepath or DEFAULT_VIDEO_SAVEPATH)
    if args.watch is not None:
        return live.watch_folder(detector, args.watch, json_path=args.json,
                                 figures_dir=None if args.no_figures else args.savepath or DEFAULT_MULTI_SAVEPATH)
    if args.benchmark:
        return benchmark(detector, [path for path, _ in inputs], args)
    return score_images(detector, inputs, labelled, masks_from, args)


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
