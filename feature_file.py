"""The feature file: a fitted detector on disk, and every check made before it is used.

An .npz archive (whatever its name: `<train_dir>.pkl` by default, as the ailia sample names it) of
plain arrays: `meta`, one JSON text saying what produced the fit (backbone, preprocessing, method and
its parameters, training settings, held-out scores, thresholds), and the arrays the method declares
(`AnomalyMethod.expected_state`), the method's features of the labelled defects taught with
--add_defects (`labelled_<name>`, AnomalyMethod.feature_state) and, for the Gaussians fitted at one
input size, their training rows (`training_<name>`, `training_groups`: what teaching more images
estimates them again from). A detector fitted at several input
sizes holds one method per size: meta's input_size, resize_size and method_params are then lists (in
ascending input size), each size's held-out scores are in scale_holdout, and each size's arrays carry
the prefix `input<S>_`. With an int8 backbone (meta `int8` true), `int8_backbone` holds the quantized
backbone's ONNX model as uint8 bytes, whose sha256 and size meta `int8_backbone` records. It is read
with allow_pickle=False after checking every member's header, so loading one cannot execute code (the
int8 backbone is parsed by onnxruntime, a protobuf: no code either); any fault is one
FeatureFileError saying what is wrong.
"""
import hashlib
import io
import json
import os
import zipfile

import numpy as np

import conditions
import history
import image_utils
import thresholds
from anomaly_model import METHODS
from errors import FeatureFileError, UsageError
from file_io import atomic_write_bytes
from holdout import check_contamination

FEATURE_FILE_FORMAT = 'mahalanobisad-features'
FEATURE_FILE_VERSION = 5  # 3: method_params hold the feature shapes the arrays follow from; 4: the history of
# changes; 5: the Gaussians' training rows and kept eigenbasis (what partial_fit updates) instead of moments
# Settings that change the features themselves: a feature file fitted with others cannot be used.
FEATURE_SETTINGS = ('backbone', 'input_size', 'resize_size', 'mean', 'std', 'feature_names', 'method', 'int8')
# Settings of the fit: the CLI does not silently reuse a default-named feature file fitted with others.
FIT_SETTINGS = ('train_dir', 'aug', 'aug_num', 'aug_rotate', 'seed', 'method_options', 'contamination')
# Largest feature file read, bytes of arrays once uncompressed (PatchCore banks of millions of patches fit).
MAX_FEATURE_FILE_BYTES = 4 << 30
# The features of labelled defect images (Detector.add_defects), K rows each, K >= 0, beside the method's state.
LABELLED_PREFIX = 'labelled_'
# The training rows of a method that keeps them (AnomalyMethod.keeps_training), N rows each, N >= 0 (0 where
# it does not: several input sizes), and each row's image.
TRAINING_PREFIX = 'training_'
TRAINING_GROUPS = 'training_groups'
MAX_META_CHARS = 1 << 24  # the history holds a 64-character sha256 per image taught


def check_settings(name, meta, settings, keys, what, hint):
    """FeatureFileError naming every setting in `keys` where `meta` (a feature file's) and
    `settings` (what is asked for now) differ."""
    differences = [f'{k} {meta.get(k)!r} here {settings[k]!r}' for k in keys if meta.get(k) != settings[k]]
    if differences:
        raise FeatureFileError(f'{name} {what}: {"; ".join(differences)}; {hint}')


def scale_prefixes(input_size):
    """The array name prefix of each input size: '' for one size (meta's input_size an int), `input<S>_`
    for each of several (a list)."""
    return [f'input{size}_' for size in input_size] if isinstance(input_size, list) else ['']


def save(path, meta, methods, int8_backbone=None):
    """Write the fitted `methods` (one per input size in meta['input_size']) and `meta` (a JSON-able
    dict saying what produced them) atomically; int8_backbone: the quantized backbone (bytes) where
    meta['int8'] is true."""
    header = dict(meta, format=FEATURE_FILE_FORMAT, version=FEATURE_FILE_VERSION, method=methods[0].name,
                  method_params=methods[0].params if len(methods) == 1 else [m.params for m in methods])
    members = {prefix + name: array for prefix, method in zip(scale_prefixes(meta.get('input_size')), methods)
               for name, array in arrays(method).items()}
    if int8_backbone is not None:
        members[INT8_MEMBER] = np.frombuffer(int8_backbone, np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(header)), **members)
    atomic_write_bytes(path, buffer.getvalue())


def arrays(method):
    """{member name: array} a feature file holds for `method`: its state, its labelled defects' features and,
    where it keeps them, its training rows."""
    members = dict(method.state(), **{LABELLED_PREFIX + name: array
                                      for name, array in method.labelled_features().items()})
    if method.keeps_training:
        kept = method.training_ is not None
        members[TRAINING_GROUPS] = method.training_groups_ if kept else np.zeros(0, np.int64)
        members.update({TRAINING_PREFIX + name: method.training_[name] if kept else np.zeros((0,) + shape, dtype)
                        for name, (shape, dtype) in method.feature_state().items()})
    return members


def load(path, max_bytes=MAX_FEATURE_FILE_BYTES):
    """Read a feature file -> (meta dict, [fitted AnomalyMethod per input size], the int8 backbone (bytes) or None).

    Everything is checked before any array is read: the archive's members must be exactly the
    metadata and the arrays each size's method declares (`expected_state`), each with the declared shape
    and dtype as its .npy header states them, its stored size equal to what that header implies
    and all of them within `max_bytes`. Arrays are then read with allow_pickle=False (a pickle, or
    anything else, is refused, never executed) and must be finite; the int8 backbone's bytes must
    have the size and sha256 meta records (a file from before int8 existed has a float backbone:
    meta['int8'] False). Any fault is one FeatureFileError
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
            scales = _methods_of(meta)
            expected = dict(_expected_state(scales), **_int8_member(meta))
            arrays = _read_state(archive, expected, max_bytes, scales[0][1].name)
            int8_backbone = _int8_backbone(arrays.pop(INT8_MEMBER, None), meta)
            for prefix, method in scales:
                own = {name[len(prefix):]: array for name, array in arrays.items() if name.startswith(prefix)}
                try:
                    method.load_state(own)
                except FeatureFileError as e:  # the arrays do not fit together: say which file
                    raise _DamagedFile(str(e)) from None
                method.labelled_ = {name[len(LABELLED_PREFIX):]: array for name, array in own.items()
                                    if name.startswith(LABELLED_PREFIX)}
                if method.keeps_training:
                    _load_training(method, own, meta)
    except FeatureFileError:
        raise
    except _DamagedFile as e:
        raise FeatureFileError(f'{path}: damaged feature file: {e}') from None
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile, RuntimeError, RecursionError,
            NotImplementedError, TypeError, MemoryError) as e:
        what = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise FeatureFileError(f'{path}: damaged feature file: {what}') from None
    return meta, [method for _, method in scales], int8_backbone


class _DamagedFile(ValueError):
    pass


def _load_training(method, arrays, meta):
    """The kept training rows into method.training_ (None where there are none), after checking that
    their images are numbered 0 .. n_train_images - 1 in order, with as many rows each."""
    groups = arrays[TRAINING_GROUPS]
    if not len(groups):
        return
    counts = np.bincount(groups) if groups.min() >= 0 else np.zeros(0, np.int64)
    if np.any(np.diff(groups) < 0) or len(counts) != meta.get('n_train_images') or len(set(counts.tolist())) != 1:
        raise _DamagedFile(f'the training rows\' images ({len(groups)} rows) are not 0 .. n_train_images - 1 in '
                           'order with as many rows each')
    method.training_ = {name[len(TRAINING_PREFIX):]: array for name, array in arrays.items()
                        if name.startswith(TRAINING_PREFIX) and name != TRAINING_GROUPS}
    method.training_groups_ = groups


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


def _methods_of(meta):
    """[(array prefix, method)] per input size: the method named by `meta`, built from each size's
    params (checked by `expected_state`)."""
    if meta.get('method') not in METHODS:
        raise FeatureFileError(f'feature file fitted with an unknown method {meta.get("method")!r}')
    sizes, params = meta.get('input_size'), meta.get('method_params')
    if isinstance(sizes, list):
        if not (isinstance(params, list) and len(params) == len(sizes) >= 2
                and all(isinstance(p, dict) for p in params)):
            raise _DamagedFile(f'method_params are not one object per input size {str(sizes)[:50]}')
    elif not isinstance(params, dict):
        raise _DamagedFile('method_params is not an object')
    scales = []
    for prefix, scale_params in zip(scale_prefixes(sizes), params if isinstance(sizes, list) else [params]):
        method = METHODS[meta['method']](**scale_params)
        try:
            method.expected_state()
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise _DamagedFile(f'{method.name} parameters: {e}') from None
        scales.append((prefix, method))
    return scales


def _expected_state(scales):
    """{prefixed name: (shape, dtype)} of every size's arrays (the method's state and its labelled
    defects' features, K of them, K >= 0); a size the params leave open (a letter) is its own per input
    size."""
    def declared(method):
        state = dict(method.expected_state(), **{
            LABELLED_PREFIX + name: (('K*',) + shape, dtype) for name, (shape, dtype) in method.feature_state().items()})
        if method.keeps_training:
            state[TRAINING_GROUPS] = (('N*',), 'int64')
            state.update({TRAINING_PREFIX + name: (('N*',) + shape, dtype)
                          for name, (shape, dtype) in method.feature_state().items()})
        return state
    return {prefix + name: (tuple(prefix + n if isinstance(n, str) else n for n in shape), dtype)
            for prefix, method in scales for name, (shape, dtype) in declared(method).items()}


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


INT8_MEMBER = 'int8_backbone'


def _int8_member(meta):
    """{INT8_MEMBER: (shape, dtype)} where meta says the backbone is int8, else {}."""
    meta.setdefault('int8', False)
    if meta['int8'] is False:
        return {}
    recorded = meta.get('int8_backbone')
    if meta['int8'] is not True or not isinstance(recorded, dict) or not isinstance(recorded.get('bytes'), int) \
            or recorded['bytes'] < 1 or not isinstance(recorded.get('sha256'), str):
        raise _DamagedFile(f'int8 {str(meta["int8"])[:20]} with int8_backbone {str(recorded)[:100]}: not a flag '
                           'and the size and sha256 of a backbone')
    return {INT8_MEMBER: ((recorded['bytes'],), 'uint8')}


def _int8_backbone(array, meta):
    """The int8 backbone's bytes from its array (None: a float backbone), checked against the sha256
    meta records."""
    if array is None:
        return None
    model_bytes = array.tobytes()
    digest = hashlib.sha256(model_bytes).hexdigest()
    if digest != meta['int8_backbone']['sha256']:
        raise _DamagedFile(f'the int8 backbone\'s sha256 {digest[:16]}... differs from the recorded '
                           f'{meta["int8_backbone"]["sha256"][:16]}...')
    return model_bytes


def _read_state(archive, expected, max_bytes, method_name):
    """The arrays `expected` ({name: (shape, dtype)}) from `archive`, after checking every member."""
    members = {name[:-len('.npy')] for name in archive.namelist() if name.endswith('.npy')} - {'meta'}
    unexpected = sorted(set(archive.namelist()) - {f'{name}.npy' for name in expected} - {'meta.npy'})
    missing = sorted(set(expected) - members)
    if unexpected or missing:
        raise _DamagedFile('; '.join(part for part in (
            f'unexpected members {", ".join(unexpected)[:200]}' if unexpected else '',
            f'missing arrays {", ".join(missing)[:200]}' if missing else '') if part) + f' for method {method_name}')
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


def _holdout_fault(record):
    """What is wrong with the held-out scores of a feature file's meta (or of one entry of its
    scale_holdout: holdout.HoldoutScores.to_meta), or None."""
    holdout = record.get('holdout_thresholds')
    if not (isinstance(holdout, dict) and _finite_number(holdout.get('image'))
            and (holdout.get('pixel') is None or _finite_number(holdout['pixel']))):
        return f'holdout_thresholds {str(holdout)[:100]} are not finite numbers'
    scores = record.get('holdout_scores', [])
    if not (isinstance(scores, list) and all(_finite_number(s) for s in scores)):
        return 'holdout_scores are not a list of finite numbers'
    maxima = record.get('holdout_pixel_maxima')
    if maxima is not None and not (isinstance(maxima, list) and all(_finite_number(s) for s in maxima)):
        return 'holdout_pixel_maxima are not a list of finite numbers'
    return None


def _sizes_fault(meta):
    """What is wrong with a feature file's input sizes (one int, or several ascending, with one
    resize_size and one scale_holdout entry of at least 2 held-out scores each), or None."""
    def side(n):
        return isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 1 << 16
    sizes, resize = meta.get('input_size'), meta.get('resize_size')
    if not isinstance(sizes, list):
        return None if side(sizes) and side(resize) else \
            f'input_size {str(sizes)[:50]} and resize_size {str(resize)[:50]} are not image sides'
    if not (2 <= len(sizes) <= 16 and all(side(n) for n in sizes) and sizes == sorted(set(sizes))
            and isinstance(resize, list) and len(resize) == len(sizes) and all(side(n) for n in resize)):
        return f'input_size {str(sizes)[:50]} and resize_size {str(resize)[:50]} are not ascending image sides'
    scales = meta.get('scale_holdout')
    if not (isinstance(scales, list) and len(scales) == len(sizes) and all(isinstance(h, dict) for h in scales)):
        return 'scale_holdout is not one record of held-out scores per input size'
    for size, record in zip(sizes, scales):
        fault = _holdout_fault(record)
        if not fault and not (isinstance(record.get('holdout_scores'), list) and len(record['holdout_scores']) >= 2):
            fault = 'holdout_scores are fewer than 2'
        if fault:
            return f'scale_holdout of input size {size}: {fault}'
    return None


def check_meta(path, meta):
    """FeatureFileError "<path>: damaged feature file: <what>" unless the Detector's own entries of a
    feature file's metadata are what `Detector.fit` and `save` write."""
    def damaged(what):
        raise FeatureFileError(f'{path}: damaged feature file: {what}')
    if meta.get('bit_depth') not in (8,) + image_utils.HIGH_BIT_DEPTHS:
        damaged(f'bit_depth {meta.get("bit_depth")!r} is not one of 8, {", ".join(map(str, image_utils.HIGH_BIT_DEPTHS))}')
    if not isinstance(meta.get('n_train_images'), int) or meta['n_train_images'] < 2:
        damaged(f'n_train_images {meta.get("n_train_images")!r} is not a count of at least 2')
    fault = _holdout_fault(meta)
    if fault:
        damaged(fault)
    stored = meta.get('thresholds')
    if stored is not None and not (isinstance(stored, dict) and isinstance(stored.get('source'), str)
                                   and (stored.get('image') is None or _finite_number(stored['image']))
                                   and (stored.get('pixel') is None or _finite_number(stored['pixel']))):
        damaged(f'thresholds {str(stored)[:100]} are not finite numbers with a source')
    if not isinstance(meta.get('method_options', {}), dict):
        damaged('method_options is not an object')
    fault = _sizes_fault(meta)
    if fault:
        damaged(fault)
    rotation = meta.get('aug_rotate')
    if rotation is not None and not (_finite_number(rotation) and 0 <= rotation <= 180):
        damaged(f'aug_rotate {str(rotation)[:50]} is not a number of degrees in 0..180')
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
    problem = conditions.meta_problem(meta.get('conditions'))
    if problem:
        damaged(problem)
    if stored is not None and stored.get('rule') not in (None,) + thresholds.RULES:
        damaged(f'thresholds.rule {str(stored.get("rule"))[:50]!r} is not one of {", ".join(thresholds.RULES)}')
    if stored is not None and stored.get('target_fpr') is not None and not _finite_number(stored['target_fpr']):
        damaged('thresholds.target_fpr is not a finite number')
    labelled = None if stored is None else stored.get('labelled')
    if labelled is not None and not (isinstance(labelled, dict) and isinstance(labelled.get('files'), str)
                                     and all(isinstance(labelled.get(k), int) for k in ('n_images', 'n_masks'))
                                     and isinstance(labelled.get('settings'), dict)):
        damaged('thresholds.labelled is not a labelled-set fingerprint')
