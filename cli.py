"""What every command shares: the argument parser that errs in one line, the flag checkers, the
model and threshold flags, the Detector they describe, and `run_cli`, which turns the tool's errors
into one line and an exit code. mahalanobisad.py, evaluate.py, score_archive.py and web_app.py import
it side by side.
"""
import argparse
import logging
import os
import sys

import numpy as np
import onnxruntime
from tqdm.contrib.logging import logging_redirect_tqdm

import anomaly_model
import file_io
import metrics
import outbox
import holdout
import image_utils
import model_utils
from conditions import DRIFT_WINDOW, SHIFT_RATE, SHIFT_WINDOW, ScoreShiftWindow
from detector import Detector
from errors import TOOL_ERRORS, UsageError

TRACEBACK_ENV = 'MAHALANOBISAD_TRACEBACK'


class OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


# ----------------------------------------------------------------------------------------------
# Flag checkers (argparse types): each a clear message for a bad value
# ----------------------------------------------------------------------------------------------

def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text}')
    return value


def shift_window(text):
    value = int(text)
    try:
        ScoreShiftWindow(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
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


def output_path(text):
    """A file or folder the tool will write: its name within the file system's limit."""
    limit = file_io.name_limit(os.path.dirname(os.path.abspath(text)))
    if len(os.fsencode(os.path.basename(os.path.normpath(text)))) > limit:
        raise argparse.ArgumentTypeError(f'name longer than the file system\'s limit of {limit} bytes: {text}')
    return text


def output_file(text):
    """A file the tool will write: not an existing directory, its name within the file system's limit."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f'{text} is a directory, a file name is needed')
    return output_path(text)


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


def input_size_value(text):
    """One --input_size: a multiple of 32 in 64..1024 (model_utils.check_input_sizes)."""
    try:
        return model_utils.check_input_sizes(int(text))[0]
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def rotation_range(text):
    """--aug_rotate: degrees in 0..180 (image_utils.check_rotation)."""
    try:
        return image_utils.check_rotation(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def port_number(text):
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f'must be a TCP port in 1..65535, got {text}')
    return value


def positive_float(text):
    value = float(text)
    if not 0 < value < float('inf'):
        raise argparse.ArgumentTypeError(f'must be a positive number, got {text}')
    return value


def publish_url(text):
    """A --publish URL -> publish.Destination (imported here: paho and requests load only for commands
    that publish)."""
    import publish
    try:
        return publish.parse_destination(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def contamination_value(text):
    try:
        return holdout.check_contamination(text if text == 'auto' else float(text))
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


OPTION_TYPES = {'count': positive_int, 'fraction': unit_fraction}  # anomaly_model.Option kinds


# ----------------------------------------------------------------------------------------------
# Flag groups shared by the commands
# ----------------------------------------------------------------------------------------------

def add_holdout_arguments(p):
    """Flags on the training hold-out (threshold for a false-positive rate, contaminated training
    folders), shared with evaluate.py."""
    p.add_argument('--fpr', type=open_fraction, default=None, metavar='ALPHA',
                   help='image (and pixel) thresholds that flag a new normal image with probability at most ALPHA, '
                        'from held-out training scores; wins over labelled images (without labelled images: '
                        '0.01, or the largest held-out score with fewer than 99 training images)')
    p.add_argument('--contamination', type=contamination_value, default=None, metavar='auto|FRACTION',
                   help='leave out training images that look defective: auto (robust outlier rule) or that share')


def add_model_arguments(p):
    """Backbone, method and fitting flags, shared with evaluate.py; each method's options come from
    its class (anomaly_model.Option)."""
    p.add_argument('-m', '--model', default=model_utils.DEFAULT_MODEL,
                   help=f'backbone: {", ".join(model_utils.MODEL_CATALOGUE)} (b0..b7 are downloaded on first use) '
                        'or a path to an .onnx feature extractor')
    p.add_argument('--method', choices=list(anomaly_model.METHODS), default='mahalanobis',
                   help='mahalanobis (pooled features, MahalanobisAD), padim, spade or patchcore')
    for option in anomaly_model.method_options():
        p.add_argument(f'--{option.flag}', type=OPTION_TYPES[option.kind], default=option.default, help=option.help)
    p.add_argument('--int8', action='store_true',
                   help='quantize the backbone to 8 bits when fitting, calibrated on the training images (about 2x '
                        'faster on CPUs with 8-bit dot products); kept in the feature file, whose later runs use it')
    p.add_argument('--input_size', type=input_size_value, nargs='+', default=None, metavar='N',
                   help='side of the square network input, a multiple of 32 (default: the backbone\'s own, 224 for '
                        'lite0; with an existing --feat, the file\'s); several: one fit per size, scores fused')
    p.add_argument('-a', '--aug', action='store_true', help='fit on augmented copies too (rotation, crop)')
    p.add_argument('-an', '--aug_num', type=positive_int, default=5, help='augmented copies per training image')
    p.add_argument('--aug_rotate', type=rotation_range, default=None, metavar='DEG',
                   help=f'with --aug: rotate the copies by up to +-DEG degrees (default '
                        f'{image_utils.AUG_MAX_ROTATION_DEG:g}; 180: parts at any angle)')
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


def add_line_arguments(p):
    """What a live run or the console tells the line: verdicts to MQTT / webhooks through the outbox
    (publish.py, outbox.py), Prometheus metrics (metrics.py), the conditions-drift and score-shift windows
    (conditions.py)."""
    p.add_argument('--publish', action='append', type=publish_url, default=None, metavar='URL',
                   help='send each verdict, each drift or score-shift warning and the summary as JSON to an MQTT topic '
                        '(mqtt://HOST[:PORT]/TOPIC, mqtts://; QoS 1) or a webhook (http://, https://; POST), '
                        'through the outbox; repeatable (see docs/line_integration.md)')
    p.add_argument('--outbox', type=output_file, default=None, metavar='PATH',
                   help='the durable outbox (SQLite) where messages wait until acknowledged; the next run sends '
                        'what is left first (default: the feature file\'s name with .outbox)')
    p.add_argument('--outbox_max_mb', type=positive_float, default=outbox.DEFAULT_MAX_MB, metavar='MB',
                   help='largest outbox; when full, new messages are dropped, counted and logged')
    p.add_argument('--metrics_port', type=port_number, default=None, metavar='N',
                   help='serve Prometheus metrics on http://METRICS_HOST:N/metrics')
    p.add_argument('--metrics_host', default=metrics.DEFAULT_HOST,
                   help='address of --metrics_port (loopback: a Prometheus on another machine needs an address of '
                        'the plant network, given deliberately)')
    p.add_argument('--drift_window', type=positive_int, default=DRIFT_WINDOW, metavar='N',
                   help='warn when most of the last N images have brightness, contrast or sharpness outside the '
                        'training images\' range')
    p.add_argument('--shift_window', type=shift_window, default=SHIFT_WINDOW, metavar='N',
                   help='warn when so many of the last N images score above the median of the training images\' '
                        'held-out scores that normal images like them would do so with probability at most '
                        f'{SHIFT_RATE:g} (the threshold\'s false-positive rate no longer holds; at least 10)')


def check_line_arguments(p, args):
    """--outbox and --outbox_max_mb mean something only with --publish."""
    if args.outbox is not None and not args.publish:
        p.error('--outbox needs --publish')


def execution_provider(env_id):
    """-e N -> the name of onnxruntime execution provider N (None: the default, CPU)."""
    if env_id is None:
        return None
    providers = onnxruntime.get_available_providers()
    if not 0 <= env_id < len(providers):
        raise UsageError(f'no execution provider {env_id}: --env_list shows 0..{len(providers) - 1}')
    return providers[env_id]


def list_providers():
    """--env_list: the onnxruntime execution providers here, numbered for -e."""
    providers = onnxruntime.get_available_providers()
    for i, name in enumerate(providers):
        print(f'{i}: {name}{"  (default)" if name == "CPUExecutionProvider" else ""}')
    return providers


def detector_from_args(args):
    """An unfitted Detector with the model and method flags of add_model_arguments (and --contamination)."""
    if args.aug_rotate is not None and not args.aug:
        raise UsageError('--aug_rotate sets the rotation of augmented copies: it needs --aug')
    return Detector(model=args.model, method=args.method, model_dir=args.model_dir, seed=args.seed,
                    batch_size=args.batch_size, model_url=args.model_url, aug_num=args.aug_num if args.aug else 0,
                    contamination=args.contamination, max_pixels=args.max_pixels,
                    provider=execution_provider(args.env_id), int8=args.int8, input_size=args.input_size,
                    aug_rotate=image_utils.AUG_MAX_ROTATION_DEG if args.aug_rotate is None else args.aug_rotate,
                    **{o.flag: getattr(args, o.flag) for o in anomaly_model.method_options()})


# ----------------------------------------------------------------------------------------------
# Running a command
# ----------------------------------------------------------------------------------------------

def run_cli(main, prog, argv=None):
    """Run `main(argv)` as a command: the tool's errors as one line on stderr and exit code 1
    (argparse's exit code 2 for bad flags), Ctrl-C as one 'interrupted' line and exit code 130
    (outputs are written atomically, so none is left half-written), progress bars kept apart from
    log lines. Anything unexpected is one line too; $MAHALANOBISAD_TRACEBACK=1 shows where it arose."""
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
    try:
        with logging_redirect_tqdm():
            main(argv)
    except TOOL_ERRORS + (OSError,) as e:
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
