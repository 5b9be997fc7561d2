"""MahalanobisAD: industrial anomaly detection on pretrained EfficientNet features.

Fit a Gaussian per network level on good images (train/), score test images by their summed
Mahalanobis distance, decide the verdict with a threshold derived from labelled images
(images/ + gt_masks/, once: stored in the feature file), and draw a four-panel figure per image.

    python3 mahalanobisad.py                              # bundled sample data
    python3 mahalanobisad.py --input IMG --savepath OUT   # one image -> OUT figure
    python3 mahalanobisad.py -v line.mp4 --json f.jsonl  # video file, image sequence or camera (live.py)
    python3 mahalanobisad.py --watch incoming/            # every image dropped into a folder (live.py)
    python3 mahalanobisad.py --watch in/ --publish mqtt://broker:1883/line3/verdicts   # tell the line (publish.py)
    python3 mahalanobisad.py -f line3.pkl --add_good reviewed/false_alarms/   # teach it, no refit (review.py)
    python3 mahalanobisad.py -f line3.pkl --history       # what it was taught, when, by whom
"""
import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import time

import cli
import image_utils
import history
import live
import plot_utils
import publish
import review
import thresholds
from cli import OneLineArgumentParser, detector_from_args
from detector import Detector, Inspection, StageTimer
from errors import FeatureFileError, ImageError, MethodError, ModelError, UsageError
from feature_file import FIT_SETTINGS, check_settings
from file_io import atomic_write_bytes, fit_path

# The API as the README shows it (from mahalanobisad import Detector), the errors the command reports, main.
__all__ = ['Detector', 'Inspection', 'StageTimer', 'FeatureFileError', 'ImageError', 'MethodError', 'ModelError',
           'UsageError', 'main', 'run']
logger = logging.getLogger('mahalanobisad')

DEFAULT_INPUT = 'images'
DEFAULT_SINGLE_SAVEPATH = 'output.png'
DEFAULT_MULTI_SAVEPATH = 'output'
DEFAULT_VIDEO_SAVEPATH = 'output.mp4'


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
    p.add_argument('--watch', type=cli.existing_dir, default=None, metavar='DIR',
                   help='score every image in DIR, then each new one once completely written, until Ctrl-C')
    p.add_argument('-s', '--savepath', type=cli.output_path, default=None,
                   help=f'figure file for one input (default {DEFAULT_SINGLE_SAVEPATH}); directory for several or '
                        f'--watch (default {DEFAULT_MULTI_SAVEPATH}/); annotated video for -v '
                        f'(default {DEFAULT_VIDEO_SAVEPATH})')
    p.add_argument('-f', '--feat', type=cli.output_file, default=None,
                   help='feature file of fitted statistics, reused if it exists (default <train_dir name>.pkl, '
                        '<train_dir name>_<method>.pkl for other methods, _<sizes> appended with --input_size)')
    p.add_argument('-tr', '--train_dir', default='train', help='directory of good training images')
    p.add_argument('-th', '--threshold', type=cli.finite_float, default=None,
                   help='image score threshold; overrides the one derived from --test_dir/--gt_dir')
    p.add_argument('--recalibrate', action='store_true',
                   help='derive the thresholds from --test_dir/--gt_dir again, even if the feature file '
                        'holds thresholds for the same labelled set')
    p.add_argument('--test_dir', type=cli.existing_dir, default=None,
                   help='labelled images for the threshold (default images, if present)')
    p.add_argument('--gt_dir', type=cli.existing_dir, default=None,
                   help='masks of --test_dir images (default gt_masks); an image without one is normal')
    p.add_argument('--no_figures', action='store_true', help='write no figures')
    p.add_argument('--json', type=cli.output_file, default=None, metavar='PATH',
                   help='write scores and verdicts as JSON (JSON Lines, one line per frame or file, with -v/--watch)')
    cli.add_holdout_arguments(p)
    p.add_argument('--export', type=cli.output_file, default=None, metavar='PATH',
                   help='write the fitted detector with its thresholds as one ONNX model (pixels in; score, map, '
                        'verdict out); scores nothing unless -i or -v is given')
    p.add_argument('--export_size', type=cli.positive_int, nargs=2, default=None, metavar=('W', 'H'),
                   help='image size the exported model takes (default: the training images\' size)')
    p.add_argument('-b', '--benchmark', action='store_true',
                   help='time the image inputs: per-stage and end-to-end milliseconds per image')
    p.add_argument('-bc', '--benchmark_count', type=cli.positive_int, default=5, help='runs of --benchmark')
    p.add_argument('--env_list', action='store_true', help='list the onnxruntime execution providers and exit')
    review_flags = p.add_argument_group('review and relearn (on an existing feature file; nothing is scored)')
    review_flags.add_argument('--add_good', type=cli.existing_dir, default=None, metavar='DIR',
                              help='teach the detector the good images in DIR (false alarms) without refitting; '
                                   'thresholds follow')
    review_flags.add_argument('--add_defects', type=cli.existing_dir, default=None, metavar='DIR',
                              help='teach the detector the defect images in DIR (missed defects): the threshold is '
                                   'derived again from all labelled defects so far (F1, or --fpr kept with its recall)')
    review_flags.add_argument('--history', action='store_true',
                              help='print what the detector was taught, when and by whom (with --json: as JSON)')
    review_flags.add_argument('--undo', action='store_true', help='revert the latest change still in effect')
    review_flags.add_argument('--by', default=None, metavar='NAME', help='who makes the change (default: the OS user)')
    cli.add_model_arguments(p)
    cli.add_line_arguments(p)
    args = p.parse_args(argv)
    if sum(x is not None for x in (args.input, args.video, args.watch)) > 1:
        p.error('give one of -i/--input, -v/--video, --watch')
    if args.realtime and args.video is None:
        p.error('--realtime needs -v/--video')
    if args.benchmark and (args.video is not None or args.watch is not None):
        p.error('-b/--benchmark times image inputs (-i)')
    if (args.publish or args.metrics_port is not None) and args.video is None and args.watch is None:
        p.error('--publish and --metrics_port are for the live modes: -v/--video or --watch')
    cli.check_line_arguments(p, args)
    if sum((args.add_good is not None, args.add_defects is not None, args.history, args.undo)) > 1:
        p.error('give one of --add_good, --add_defects, --history, --undo')
    return args


# ----------------------------------------------------------------------------------------------
# feature file: reuse or fit
# ----------------------------------------------------------------------------------------------

def feature_file_path(args):
    """--feat, or <train_dir name>.pkl (<train_dir name>_<method>.pkl for methods other than mahalanobis;
    with --input_size, the sizes appended, and _int8 with --int8: train_patchcore_224-384_int8.pkl)."""
    suffix = '' if args.method == 'mahalanobis' else '_' + args.method
    if args.input_size:
        suffix += '_' + '-'.join(map(str, sorted(args.input_size)))
    suffix += '_int8' if args.int8 else ''
    return args.feat or os.path.basename(os.path.normpath(args.train_dir)) + suffix + '.pkl'


def load_or_fit(detector, args):
    """`detector` (unfitted, with the CLI's flags) -> a fitted Detector: reused from the feature file if
    it exists, else fitted and saved."""
    feat_path = feature_file_path(args)
    if os.path.exists(feat_path):
        fitted = Detector.load(feat_path, **detector.load_options(), int8=args.int8 or None,
                               input_size=args.input_size)
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


def decide_thresholds(detector, args, labelled):
    """The thresholds the flags ask for (thresholds.choose), stored in the feature file when they were
    derived from labelled images now -> {realpath: Inspection} of the labelled images scored for them."""
    scored = thresholds.choose(detector, args.threshold, args.fpr, labelled, args.recalibrate)
    if scored is None:
        return {}
    feat_path = feature_file_path(args)
    try:
        detector.save(feat_path)
        logger.info('stored the thresholds in %s: later runs with this labelled set reuse them', feat_path)
    except OSError as e:  # the run can go on; the next one calibrates again
        logger.warning('cannot store the thresholds in %s: %s', feat_path, e)
    return scored


def review_feature_file(args, detector):
    """--add_good, --add_defects, --undo, --history on the existing feature file, loaded as `detector` (the
    flags' Detector) would run it -> the history entries."""
    feat_path = feature_file_path(args)
    if not os.path.exists(feat_path):
        raise UsageError(f'no feature file {feat_path} to review: fit one first (or pass -f)')
    options = detector.load_options()
    if args.add_good is not None:
        detector = review.add_good(feat_path, image_utils.list_images(args.add_good), args.by, **options)
    elif args.add_defects is not None:
        detector = review.add_defects(feat_path, image_utils.list_images(args.add_defects), args.by, **options)
    elif args.undo:
        detector = review.undo(feat_path, args.by, **options)
    else:
        detector = Detector.load(feat_path, **options)
    entries = detector.meta_.get('history', [])
    if args.history:
        print('\n'.join(history.format_history(entries)))
        if args.json:
            atomic_write_bytes(args.json, json.dumps({'feature_file': feat_path, 'history': entries}, indent=1).encode())
    else:
        logger.info('%s: %d training images, threshold %.4g (%s)', feat_path, detector.meta_['n_train_images'],
                    detector.threshold_, detector.threshold_source_)
    return entries


# ----------------------------------------------------------------------------------------------
# image mode
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
                      else fit_path(os.path.join(args.savepath or DEFAULT_MULTI_SAVEPATH, name + '.png')))
        # The threshold may have changed since the labelled images were inspected: the verdict is recomputed.
        results.append(live.report_image(detector, path, inspected, inspected.score >= detector.threshold_,
                                         figure, figures))
    return results


def score_images(detector, inputs, scored, labelled, args):
    """Image mode: verdicts, figures and the JSON report of `inputs` -> JSON records. scored:
    {realpath: Inspection} of labelled images already scored; labelled: the LabelledSet (masks), or None."""
    logger.info('scoring %d images (threshold %.3f from %s)', len(inputs), detector.threshold_,
                detector.threshold_source_)
    fresh_paths = [p for p, _ in inputs if os.path.realpath(p) not in scored]
    masks = [labelled.mask_of(p) for p in fresh_paths] if labelled is not None else None
    fresh = detector.inspect(fresh_paths, masks)
    with contextlib.closing(fresh), plot_utils.FigureWriter() as figures:
        results = report_images(inputs, scored, fresh, detector, args, figures)
    if not results:
        raise ImageError(f'none of the {len(inputs)} input images could be read')
    logger.info('%d of %d images anomalous', sum(r['anomaly'] for r in results), len(results))
    if args.json:
        report = {'model': detector.spec.name, 'threshold': detector.threshold_,
                  'threshold_source': image_utils.display_path(detector.threshold_source_),
                  'pixel_threshold': detector.pixel_threshold_, 'target_fpr': detector.target_fpr_,
                  'n_holdout': len(detector.meta_['holdout_scores']),
                  'excluded_train_images': detector.meta_.get('excluded_train_images', []),
                  'history': [{k: v for k, v in entry.items() if k != 'images'}
                              for entry in detector.meta_.get('history', [])], 'images': results}
        atomic_write_bytes(args.json, json.dumps(report, indent=1).encode())
        logger.info('wrote %s', args.json)
    return results


BENCHMARK_STAGES = ('decode', 'backbone', 'scoring', 'figure', 'end to end')


def benchmark(detector, paths, args):
    """-b: score `paths` --benchmark_count times, as the ailia sample's benchmark -> [{stage: ms per image}]
    per run, printed as min / median / max. decode is summed over the decoding threads (it overlaps
    the backbone, so the stages do not add up to end to end); figure renders on this thread, writes nothing."""
    runs = []
    for run_index in range(args.benchmark_count):
        timer = StageTimer()
        start = time.perf_counter()
        for result in detector.inspect(paths, desc=f'benchmark run {run_index + 1}', timer=timer):
            if not args.no_figures and result.error is None:
                with timer('figure'):
                    detector.render_figure(result)
        timer.seconds['end to end'] = time.perf_counter() - start
        runs.append({stage: 1000 * seconds / len(paths) for stage, seconds in timer.seconds.items()})
        logger.info('benchmark run %d: %.1f ms per image end to end', run_index + 1, runs[-1]['end to end'])
    print(f'{"ms per image":<12} {"min":>8} {"median":>8} {"max":>8}   ({len(paths)} images, {len(runs)} runs)')
    for stage in (s for s in BENCHMARK_STAGES if s in runs[0]):
        values = [r[stage] for r in runs]
        print(f'{stage:<12} {min(values):8.2f} {statistics.median(values):8.2f} {max(values):8.2f}')
    return runs


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    if args.env_list:
        return cli.list_providers()
    thresholds.check_request(args.threshold, args.fpr)
    if args.export_size and not args.export:
        raise UsageError('--export_size needs --export PATH')
    detector = detector_from_args(args)
    if args.add_good is not None or args.add_defects is not None or args.history or args.undo:
        return review_feature_file(args, detector)
    detector.spec  # opens (or downloads) the backbone first: a bad -m fails before any other work
    image_mode = args.video is None and args.watch is None
    export_only = args.export is not None and args.input is None and image_mode
    inputs = list_inputs(args.input or [DEFAULT_INPUT]) if image_mode and not export_only else None
    if inputs and len(inputs) > 1 and args.savepath and image_utils.is_image_file(args.savepath):
        raise UsageError(f'{len(inputs)} inputs: --savepath must be a directory, not {args.savepath}')

    detector = load_or_fit(detector, args)
    labelled = thresholds.LabelledSet.find(args.test_dir, args.gt_dir)
    scored = decide_thresholds(detector, args, labelled)
    if args.export:
        detector.export(args.export, args.export_size)
        if export_only:
            return []

    if args.video is not None or args.watch is not None:
        return inspect_live(detector, args)
    if args.benchmark:
        return benchmark(detector, [path for path, _ in inputs], args)
    return score_images(detector, inputs, scored, labelled, args)


def inspect_live(detector, args):
    """-v or --watch, telling the line what the flags ask (publish.report_from_args: --publish through
    the outbox, default <feature file>.outbox; --metrics_port) -> the summary."""
    source = f'video:{args.video}' if args.video is not None else f'watch:{args.watch}'
    default_outbox = os.path.splitext(feature_file_path(args))[0] + '.outbox'
    with publish.report_from_args(args, detector, source, default_outbox) as report:
        if args.video is not None:
            return live.inspect_video(detector, args.video, realtime=args.realtime, json_path=args.json,
                                      savepath=None if args.no_figures else args.savepath or DEFAULT_VIDEO_SAVEPATH,
                                      report=report)
        return live.watch_folder(detector, args.watch, json_path=args.json, report=report,
                                 figures_dir=None if args.no_figures else args.savepath or DEFAULT_MULTI_SAVEPATH)


def run(argv=None):
    return cli.run_cli(main, 'mahalanobisad.py', argv)


if __name__ == '__main__':
    sys.exit(run())
