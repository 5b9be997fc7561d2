"""The feature file: a fitted detector on disk, and every check made before it is used.

An .npz archive (whatever its name: `<train_dir>.pkl` by default, as the ailia sample names it) of
plain arrays: `meta`, one JSON text saying what produced the fit (backbone, preprocessing, method and
its parameters, training settings, held-out scores, thresholds), and the arrays the method declares
(`AnomalyMethod.expected_state`), and the method's features of the labelled defects taught with
--add_defects (`labelled_<name>`, AnomalyMethod.feature_state). It is read with allow_pickle=False after checking every member's
header, so loading one cannot execute code; any fault is one FeatureFileError saying what is wrong.
"""
import io
import json
import os
import zipfile

import numpy as np

import history
import image_utils
import thresholds
from anomaly_model import METHODS
from errors import FeatureFileError, UsageError
from file_io import atomic_write_bytes
from holdout import check_contamination

FEATURE_FILE_FORMAT = 'mahalanobisad-features'
FEATURE_FILE_VERSION = 4  # 3: method_params hold the feature shapes the arrays follow from; 4: the Gaussians'
# moments (what partial_fit updates), the history of changes
# Settings that change the features themselves: a feature file fitted with others cannot be used.
FEATURE_SETTINGS = ('backbone', 'input_size', 'resize_size', 'mean', 'std', 'feature_names', 'method')
# Settings of the fit: the CLI does not silently reuse a default-named feature file fitted with others.
FIT_SETTINGS = ('train_dir', 'aug', 'aug_num', 'seed', 'method_options', 'contamination')
# Largest feature file read, bytes of arrays once uncompressed (PatchCore banks of millions of patches fit).
MAX_FEATURE_FILE_BYTES = 4 << 30
# The features of labelled defect images (Detector.add_defects), K rows each, K >= 0, beside the method's state.
LABELLED_PREFIX = 'labelled_'
MAX_META_CHARS = 1 << 24  # the history holds a 64-character sha256 per image taught


def check_settings(name, meta, settings, keys, what, hint):
    """FeatureFileError naming every setting in `keys` where `meta` (a feature file's) and
    `settings` (what is asked for now) differ."""
    differences = [f'{k} {meta.get(k)!r} here {settings[k]!r}' for k in keys if meta.get(k) != settings[k]]
    if differences:
        raise FeatureFileError(f'{name} {what}: {"; ".join(differences)}; {hint}')


def save(path, meta, method):
    """Write the fitted `method` and `meta` (a JSON-able dict saying what produced it) atomically."""
    header = dict(meta, format=FEATURE_FILE_FORMAT, version=FEATURE_FILE_VERSION,
                  method=method.name, method_params=method.params)
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(header)), **arrays(method))
    atomic_write_bytes(path, buffer.getvalue())


def arrays(method):
    """{member name: array} a feature file holds for `method`: its state and its labelled defects' features."""
    labelled = {LABELLED_PREFIX + name: array for name, array in method.labelled_features().items()}
    return dict(method.state(), **labelled)


def load(path, max_bytes=MAX_FEATURE_FILE_BYTES):
    """Read a feature file -> (meta dict, fitted AnomalyMethod).

    Everything is checked before any array is read: the archive's members must be exactly the
    metadata and the arrays the method declares (`expected_state`), each with the declared shape
    and dtype as its .npy header states them, its stored size equal to what that header implies
    and all of them within `max_bytes`. Arrays are then read with allow_pickle=False (a pickle, or
    anything else, is refused, never executed) and must be finite. Any fault is one FeatureFileError
    "<path>: damaged feature file: <what>". The Detector's own entries of `meta` are checked by
    check_meta.
    """
    if not os.path.isfile(path):
        raise FeatureFileError(f'feature file not found: {path}')
    if not zipfile.is_zipfile(path):
        raise FeatureFileError(f'{path} is not a feature file of this tool (pickles are never loaded: '
                               'they can execute code); delete it or pass another --feat to refit')
    try:
        with zipfile.ZipFile(path) as archive:
            meta = _read_meta(archive)
            if meta.get('format') != FEATURE_FILE_FORMAT:
                raise FeatureFileError(f'{path} is not a feature file of this tool')
            if meta.get('version') != FEATURE_FILE_VERSION:
                raise FeatureFileError(f'{path} has feature file version {meta.get("version")}, '
                                       f'this tool reads version {FEATURE_FILE_VERSION}; refit it')
            method = _method_of(meta)
            arrays = _read_state(archive, method, max_bytes)
            method.load_state(arrays)
            method.labelled_ = {name[len(LABELLED_PREFIX):]: array for name, array in arrays.items()
                                if name.startswith(LABELLED_PREFIX)}
    except FeatureFileError:
        raise
    except _DamagedFile as e:
        raise FeatureFileError(f'{path}: damaged feature file: {e}') from None
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile, RuntimeError, RecursionError,
            NotImplementedError, TypeError, MemoryError) as e:
        what = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise FeatureFileError(f'{path}: damaged feature file: {what}') from None
    return meta, method


class _DamagedFile(ValueError):
    pass


def _read_meta(archive):
    names = archive.namelist()
    if len(names) != len(set(names)):
        raise _DamagedFile('duplicate archive members')
    if 'meta.npy' not in names:
        raise _DamagedFile('no meta member')
    with _open_member(archive, 'meta.npy') as f:
        shape, fortran, dtype = _npy_header(f, 'meta')
        if shape != () or dtype.kind != 'U' or dtype.itemsize > 4 * MAX_META_CHARS:
            raise _DamagedFile(f'meta is {dtype} {shape}, not a text of at most {MAX_META_CHARS} characters')
        _check_stored_size(archive.getinfo('meta.npy'), f, dtype.itemsize, 'meta')
        text = str(_read_data(f, shape, fortran, dtype))
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise _DamagedFile(f'meta is not JSON ({str(e)[:100]})') from None
    if not isinstance(meta, dict):
        raise _DamagedFile('meta is not a JSON object')
    return meta


def _method_of(meta):
    """The method named by `meta`, built from its params (checked by `expected_state`)."""
    if meta.get('method') not in METHODS:
        raise FeatureFileError(f'feature file fitted with an unknown method {meta.get("method")!r}')
    params = meta.get('method_params')
    if not isinstance(params, dict):
        raise _DamagedFile('method_params is not an object')
    method = METHODS[meta['method']](**params)
    try:
        method.expected_state()
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise _DamagedFile(f'{method.name} parameters: {e}') from None
    return method


def _open_member(archive, name):
    info = archive.getinfo(name)
    if info.flag_bits & 0x1:
        raise _DamagedFile(f'member {name} is encrypted')
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _DamagedFile(f'member {name} uses compression type {info.compress_type}')
    return archive.open(info)


def _npy_header(f, name):
    """(shape, fortran_order, dtype) from the .npy header at the start of the open member `f` (a few
    hundred bytes read); an object dtype (pickles) is refused here."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        header = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        header = np.lib.format.read_array_header_2_0(f)
    else:
        raise _DamagedFile(f'member {name} has .npy version {version}')
    if header[2].hasobject:
        raise _DamagedFile(f'member {name} holds Python objects (never loaded: they can execute code)')
    return header


def _read_data(f, shape, fortran, dtype):
    """The array data following the header in `f`, exactly as many bytes as shape and dtype take."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    data = bytearray(nbytes)
    view, filled = memoryview(data), 0
    while filled < nbytes:
        count = f.readinto(view[filled:])
        if not count:
            raise _DamagedFile('array data cut short')
        filled += count
    return np.frombuffer(data, dtype).reshape(shape, order='F' if fortran else 'C')


def _check_stored_size(info, f, nbytes, name):
    if info.file_size != f.tell() + nbytes:
        raise _DamagedFile(f'member {name} stores {info.file_size} bytes, its header implies {f.tell() + nbytes}')


def _read_state(archive, method, max_bytes):
    """The arrays `method` declares (`expected_state`) from `archive`, after checking every member."""
    expected = dict(method.expected_state(), **{LABELLED_PREFIX + name: (('K*',) + shape, dtype)
                                                for name, (shape, dtype) in method.feature_state().items()})
    members = {name[:-len('.npy')] for name in archive.namelist() if name.endswith('.npy')} - {'meta'}
    unexpected = sorted(set(archive.namelist()) - {f'{name}.npy' for name in expected} - {'meta.npy'})
    missing = sorted(set(expected) - members)
    if unexpected or missing:
        raise _DamagedFile('; '.join(part for part in (
            f'unexpected members {", ".join(unexpected)[:200]}' if unexpected else '',
            f'missing arrays {", ".join(missing)[:200]}' if missing else '') if part) + f' for method {method.name}')
    sizes, total = {}, 0
    for name, (shape, dtype) in expected.items():
        with _open_member(archive, f'{name}.npy') as f:
            stored_shape, _, stored_dtype = _npy_header(f, name)
            if stored_dtype.kind != np.dtype(dtype).kind or stored_dtype.itemsize != np.dtype(dtype).itemsize:
                raise _DamagedFile(f'array {name} is {stored_dtype}, the method needs {dtype}')
            if len(stored_shape) != len(shape) or not all(
                    n >= 1 or (isinstance(w, str) and w.endswith('*')) for n, w in zip(stored_shape, shape)):
                raise _DamagedFile(f'array {name} has shape {stored_shape}, the method needs {shape}')
            for stored, wanted in zip(stored_shape, shape):
                if isinstance(wanted, str):
                    wanted = sizes.setdefault(wanted, stored)
                if stored != wanted:
                    raise _DamagedFile(f'array {name} has shape {stored_shape}, the method needs '
                                       f'{tuple(sizes.get(n, n) for n in shape)}')
            nbytes = int(np.prod(stored_shape, dtype=object)) * stored_dtype.itemsize
            _check_stored_size(archive.getinfo(f'{name}.npy'), f, nbytes, name)
            total += nbytes
    if total > max_bytes:
        raise _DamagedFile(f'arrays of {total / 2**20:.0f} MiB, above the limit of {max_bytes / 2**20:.0f} MiB')
    arrays = {}
    for name in expected:
        with _open_member(archive, f'{name}.npy') as f:
            array = _read_data(f, *_npy_header(f, name))
        if not np.isfinite(array).all():
            raise _DamagedFile(f'array {name} holds values that are not finite')
        arrays[name] = array.astype(np.dtype(expected[name][1]).newbyteorder('='), copy=False)
    return arrays


def _finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def check_meta(path, meta):
    """FeatureFileError "<path>: damaged feature file: <what>" unless the Detector's own entries of a
    feature file's metadata are what `Detector.fit` and `save` write."""
    def damaged(what):
        raise FeatureFileError(f'{path}: damaged feature file: {what}')
    if meta.get('bit_depth') not in (8,) + image_utils.HIGH_BIT_DEPTHS:
        damaged(f'bit_depth {meta.get("bit_depth")!r} is not one of 8, {", ".join(map(str, image_utils.HIGH_BIT_DEPTHS))}')
    if not isinstance(meta.get('n_train_images'), int) or meta['n_train_images'] < 2:
        damaged(f'n_train_images {meta.get("n_train_images")!r} is not a count of at least 2')
    holdout = meta.get('holdout_thresholds')
    if not (isinstance(holdout, dict) and _finite_number(holdout.get('image'))
            and (holdout.get('pixel') is None or _finite_number(holdout['pixel']))):
        damaged(f'holdout_thresholds {str(holdout)[:100]} are not finite numbers')
    stored = meta.get('thresholds')
    if stored is not None and not (isinstance(stored, dict) and isinstance(stored.get('source'), str)
                                   and (stored.get('image') is None or _finite_number(stored['image']))
                                   and (stored.get('pixel') is None or _finite_number(stored['pixel']))):
        damaged(f'thresholds {str(stored)[:100]} are not finite numbers with a source')
    scores = meta.get('holdout_scores', [])
    if not (isinstance(scores, list) and all(_finite_number(s) for s in scores)):
        damaged('holdout_scores are not a list of finite numbers')
    if not isinstance(meta.get('method_options', {}), dict):
        damaged('method_options is not an object')
    maxima = meta.get('holdout_pixel_maxima')
    if maxima is not None and not (isinstance(maxima, list) and all(_finite_number(s) for s in maxima)):
        damaged('holdout_pixel_maxima are not a list of finite numbers')
    try:
        history.check(meta.get('history', []))
    except ValueError as e:
        damaged(str(e))
    excluded = meta.get('excluded_train_images', [])
    if not (isinstance(excluded, list) and all(isinstance(name, str) for name in excluded)):
        damaged('excluded_train_images is not a list of names')
    try:
        check_contamination(meta.get('contamination'))
    except UsageError as e:
        damaged(str(e))
    if stored is not None and stored.get('rule') not in (None,) + thresholds.RULES:
        damaged(f'thresholds.rule {str(stored.get("rule"))[:50]!r} is not one of {", ".join(thresholds.RULES)}')
    if stored is not None and stored.get('target_fpr') is not None and not _finite_number(stored['target_fpr']):
        damaged('thresholds.target_fpr is not a finite number')
    labelled = None if stored is None else stored.get('labelled')
    if labelled is not None and not (isinstance(labelled, dict) and isinstance(labelled.get('files'), str)
                                     and all(isinstance(labelled.get(k), int) for k in ('n_images', 'n_masks'))
                                     and isinstance(labelled.get('settings'), dict)):
        damaged('thresholds.labelled is not a labelled-set fingerprint')
