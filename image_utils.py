"""Images: finding, decoding, preprocessing, augmentation, ground-truth masks, batching.

An image becomes a network input here: `load_image` decodes any supported file to RGB uint8
(H, W, 3); `resize_short_side` + `center_crop` give the network's square view; `to_tensor`
normalises it to (3, S, S) float32. Masks get the same geometry, so a pixel of a map and of a
mask always refer to the same place. Every file is checked from its header (format, size, memory
it would take) before any pixel is decoded: see `_checked`.
"""
import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import os
import stat
import struct
import threading

import cv2
import numpy as np

from errors import ImageError, UsageError
from file_io import display_path

# Parallelism is per image (see `stream`): OpenCV's own worker threads would only compete with it.
cv2.setNumThreads(1)
# A file OpenCV cannot decode becomes one ImageError saying why; OpenCV's own log lines about it
# would only repeat that, unformatted (libpng's "libpng error: ..." lines are its own and remain).
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
MASK_SUFFIXES = ('', '_mask')
AUG_MAX_ROTATION_DEG = 10.0  # the augmentation's default rotation range, +- degrees
CROP_FRACTION = 0.875  # the network's view: the centre 87.5% of the resized image's shorter side
# Larger images are refused from their header, before decoding (--max_pixels): 8192 x 8192.
DEFAULT_MAX_PIXELS = 8192 * 8192
OPENCV_MAX_PIXELS = 1 << 30  # OpenCV refuses larger images itself (OPENCV_IO_MAX_IMAGE_PIXELS)
# The view resizes the shorter side to ~256 px: a 60000 x 1 strip would become 15360000 x 256 (11 GB).
# Longer sides than this many times the shorter are refused, so the resized image stays <= 64 MP.
MAX_ASPECT_RATIO = 1024
# Decoded samples may take at most max_pixels x this many bytes: 16-bit RGB at the pixel limit
# (alpha is dropped while decoding); so float TIFFs are held to a smaller size.
BYTES_PER_PIXEL_LIMIT = 6
# A file larger than this cannot be an image within the limit (uncompressed 16-bit RGBA TIFF,
# plus metadata); it is refused before it is read.
MAX_FILE_BYTES_PER_PIXEL, MAX_FILE_OVERHEAD = 8, 16 << 20

logger = logging.getLogger(__name__)


# Cores this process may use, where it shares a machine with others (score_archive's Dask workers set it).
THREADS_ENV = 'MAHALANOBISAD_THREADS'


def thread_budget():
    """The number of threads for decoding and the backbone: $MAHALANOBISAD_THREADS if it is a
    positive integer, else every core."""
    value = os.environ.get(THREADS_ENV, '')
    return int(value) if value.isdigit() and int(value) > 0 else os.cpu_count() or 1


def is_image_file(path):
    return path.lower().endswith(IMAGE_EXTENSIONS)


def list_images(paths):
    """Image files under `paths` (files, or directories searched recursively), sorted per directory.

    A path inside a directory is returned as the directory joined with the file's relative path.
    Raises ImageError for a missing path, a non-image file, or when nothing is found.
    """
    if isinstance(paths, str):
        paths = [paths]
    found = []
    for path in paths:
        if os.path.isdir(path):
            in_dir = list(walk_images(path))
            if not in_dir:
                raise ImageError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) found in directory {display_path(path)}')
            found += in_dir
        elif os.path.isfile(path):
            if not is_image_file(path):
                raise ImageError(f'not an image file (expected {", ".join(IMAGE_EXTENSIONS)}): {display_path(path)}')
            found.append(path)
        else:
            raise ImageError(f'no such file or directory: {display_path(path)}')
    return found


def flat_name(path, folder):
    """path relative to folder, without its extension, directories joined by '_': the name of its
    figure in a flat output folder."""
    return os.path.splitext(os.path.relpath(path, folder))[0].replace(os.sep, '_')


def walk_images(directory, exclude=()):
    """Yield the image files under `directory`, lazily, in `list_images` order and form (the directory
    joined with each file's relative path): a listing of any size in constant memory. exclude: real
    paths (os.path.realpath) of directories not to look into."""
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not exclude or os.path.realpath(os.path.join(root, d)) not in exclude)
        yield from (os.path.join(root, f) for f in sorted(files) if is_image_file(f))


# ----------------------------------------------------------------------------------------------
# Decoding with bounded memory
# ----------------------------------------------------------------------------------------------

Header = collections.namedtuple('Header', 'format width height channels bits is_float')
Header.__doc__ = """What a file's header says: format ('PNG', 'JPEG', 'BMP', 'TIFF'), size in pixels,
channels stored (alpha included), bits per sample, and whether samples are floating point."""


def _png_header(data):
    if len(data) < 33 or data[12:16] != b'IHDR':
        raise ValueError('PNG without an IHDR header')
    width, height, bits, colour_type = struct.unpack('>IIBB', data[16:26])
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(colour_type)
    if channels is None:
        raise ValueError(f'PNG colour type {colour_type}')
    return Header('PNG', width, height, channels, bits, False)


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_header(data):
    """The first frame header (SOFn), found by walking the marker segments."""
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise ValueError('JPEG marker expected')
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        if marker in (0xD9, 0xDA):
            break
        length = struct.unpack('>H', data[position + 2:position + 4])[0]
        if marker in _JPEG_SOF:
            if position + 10 > len(data):
                break
            bits, height, width, components = struct.unpack('>BHHB', data[position + 4:position + 10])
            if height == 0:
                raise ValueError('JPEG without a height in its frame header')
            return Header('JPEG', width, height, components, bits, False)
        position += 2 + length
    raise ValueError('JPEG without a frame header')


def _bmp_header(data):
    if len(data) < 30:
        raise ValueError('BMP header cut short')
    if struct.unpack('<I', data[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER
        width, height, _, bits = struct.unpack('<HHHH', data[18:26])
    else:
        width, height, _, bits = struct.unpack('<iiHH', data[18:30])
    channels = 4 if bits == 32 else 3
    return Header('BMP', abs(width), abs(height), channels, 8, False)


_TIFF_TYPE_SIZE = {1: 1, 3: 2, 4: 4, 16: 8}  # BYTE, SHORT, LONG, LONG8: the types of the tags read
_TIFF_MAX_ENTRIES = 4096


def _tiff_header(data):
    """Size, samples and sample format from the first image directory (the page OpenCV decodes);
    classic TIFF and BigTIFF."""
    order = '<' if data[:2] == b'II' else '>'
    big = struct.unpack(order + 'H', data[2:4])[0] == 43
    if big:
        first, entry_size, count_format, offset_format = struct.unpack(order + 'Q', data[8:16])[0], 20, 'Q', 'Q'
    else:
        first, entry_size, count_format, offset_format = struct.unpack(order + 'I', data[4:8])[0], 12, 'H', 'I'
    count_size = struct.calcsize(count_format)
    entries = struct.unpack(order + count_format, data[first:first + count_size])[0]
    if entries > _TIFF_MAX_ENTRIES:
        raise ValueError(f'TIFF directory of {entries} entries')
    field_size = struct.calcsize(offset_format)
    tags = {}
    for i in range(entries):
        at = first + count_size + i * entry_size
        tag, kind = struct.unpack(order + 'HH', data[at:at + 4])
        if tag not in (256, 257, 258, 262, 277, 339) or kind not in _TIFF_TYPE_SIZE:
            continue
        size = _TIFF_TYPE_SIZE[kind]
        count = struct.unpack(order + offset_format, data[at + 4:at + 4 + field_size])[0]
        value_at = at + 4 + field_size
        if count * size > field_size:  # values stored elsewhere: the first one is enough
            value_at = struct.unpack(order + offset_format, data[value_at:value_at + field_size])[0]
        tags[tag] = struct.unpack(order + {1: 'B', 2: 'H', 4: 'I', 8: 'Q'}[size],
                                  data[value_at:value_at + size])[0]
    if 256 not in tags or 257 not in tags:
        raise ValueError('TIFF without an image size')
    channels = tags.get(277, 1)
    if tags.get(262) == 3:  # palette: decoded to colour
        channels = 3
    return Header('TIFF', tags[256], tags[257], channels, tags.get(258, 1), tags.get(339, 1) == 3)


_SIGNATURES = ((b'\x89PNG\r\n\x1a\n', _png_header), (b'\xff\xd8\xff', _jpeg_header), (b'BM', _bmp_header),
               (b'II*\x00', _tiff_header), (b'MM\x00*', _tiff_header), (b'II+\x00', _tiff_header),
               (b'MM\x00+', _tiff_header))


def parse_header(data):
    """Header of an image file held in `data` (bytes-like), read without decoding any pixel.

    Written here rather than taken from Pillow: Pillow refuses float TIFFs that OpenCV decodes,
    does not report the bits per sample of colour PNGs, and raises a dozen exception types on
    damaged headers. Raises ValueError for anything but a readable PNG, JPEG, BMP or TIFF header
    (which also keeps OpenCV's other decoders, EXR, HDR, JPEG 2000..., away from user files).
    """
    data = memoryview(data).cast('B')
    for signature, parse in _SIGNATURES:
        if bytes(data[:len(signature)]) == signature:
            try:
                header = parse(data)
            except (struct.error, IndexError) as e:
                raise ValueError(f'{signature!r} header cut short or malformed ({e})') from None
            if header.width == 0 or header.height == 0:
                raise ValueError(f'{header.format} header gives no image ({header.width}x{header.height})')
            return header
    raise ValueError('not a PNG, JPEG, BMP or TIFF file')


def _decoded_channels(header, keep_alpha):
    if keep_alpha:
        return min(header.channels, 4)
    return 1 if header.channels <= 2 else 3


def _sample_bytes(header):
    if header.is_float:
        if header.bits not in (32, 64):
            raise ValueError(f'{header.bits}-bit floating-point samples')
        return header.bits // 8
    if not 1 <= header.bits <= 16:
        raise ValueError(f'{header.bits}-bit integer samples (1 to 16 are read)')
    return 2 if header.bits > 8 else 1


# Decodes above this size take turns (one at a time), so that the decoding threads of `stream` hold
# at most one large image at once: peak memory is one image at the limit plus the small ones.
LARGE_DECODE_BYTES = 64 << 20
_large_decode = threading.Lock()


@contextlib.contextmanager
def _decode_slot(nbytes):
    if nbytes <= LARGE_DECODE_BYTES:
        yield
    else:
        with _large_decode:
            yield


HEADER_BYTES = 1 << 16  # read first; the whole file only when a header lies further in (JPEG after big APP segments)
# Decoding from the open file descriptor: OpenCV streams the file and writes the image straight into
# the array it returns (imdecode of bytes would hold the file and a second copy of the image).
_PROC_FD = os.path.isdir('/proc/self/fd')


@contextlib.contextmanager
def _checked(path, max_pixels, keep_alpha=False):
    """Open `path`, check its header against the limits and hold a decoding slot; yields
    (header, decode) where decode() -> the image in OpenCV's layout (see `_decode`).

    Limits: width x height <= max_pixels; the decoded samples (alpha dropped unless `keep_alpha`)
    within max_pixels x BYTES_PER_PIXEL_LIMIT bytes; the file no larger than such an image can be.
    """
    try:  # O_NONBLOCK: a named pipe called x.png must not hang the run (no effect on regular files)
        fd = os.open(path, os.O_RDONLY | getattr(os, 'O_CLOEXEC', 0) | getattr(os, 'O_BINARY', 0)
                     | getattr(os, 'O_NONBLOCK', 0))
    except OSError as e:
        raise ImageError(f'cannot read {display_path(path)}: {e.strerror or e}') from None
    try:
        header, nbytes = _check_header(path, fd, max_pixels, keep_alpha)
        with _decode_slot(nbytes):
            yield header, lambda: _decode(path, fd, header, keep_alpha)
    finally:
        os.close(fd)


def _read_start(fd, count):
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while count > 0:
        chunk = os.read(fd, min(count, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        count -= len(chunk)
    return b''.join(chunks)


def _check_header(path, fd, max_pixels, keep_alpha):
    """-> (header, bytes the decoded image takes), or ImageError if a limit is exceeded."""
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise ImageError(f'cannot read {display_path(path)}: not a regular file')
        size = status.st_size
        if size > max_pixels * MAX_FILE_BYTES_PER_PIXEL + MAX_FILE_OVERHEAD:
            raise ImageError(f'refusing {display_path(path)}: {size / 2**20:.0f} MiB is more than an image of '
                             f'--max_pixels {max_pixels} can need')
        start = _read_start(fd, HEADER_BYTES)
        try:
            header = parse_header(start)
        except ValueError:
            if size <= len(start):
                raise
            header = parse_header(_read_start(fd, size))
        sample_bytes = _sample_bytes(header)
        if header.format == 'PNG':
            _check_png_chunks(fd, size)
    except OSError as e:
        raise ImageError(f'cannot read {display_path(path)}: {e.strerror or e}') from None
    except ValueError as e:
        raise ImageError(f'cannot decode {display_path(path)}: {e}') from None
    pixels = header.width * header.height
    if max(header.width, header.height) > MAX_ASPECT_RATIO * min(header.width, header.height):
        raise ImageError(f'refusing {display_path(path)}: {header.width}x{header.height} is longer than '
                         f'{MAX_ASPECT_RATIO} times its width (the network view would not fit in memory)')
    if pixels > max_pixels:
        raise ImageError(f'refusing {display_path(path)}: {header.width}x{header.height} is {pixels} pixels, '
                         f'above --max_pixels {max_pixels}')
    nbytes = pixels * _decoded_channels(header, keep_alpha) * sample_bytes
    if nbytes > max_pixels * BYTES_PER_PIXEL_LIMIT:
        raise ImageError(f'refusing {display_path(path)}: {header.width}x{header.height} with {header.channels} '
                         f'channels of {header.bits} bits needs {nbytes / 2**20:.0f} MiB to decode, more than '
                         f'--max_pixels {max_pixels} allows')
    return header, nbytes


def _check_png_chunks(fd, size):
    """ValueError if a PNG chunk declares more bytes than the file holds: OpenCV's PNG reader
    allocates (and zero-fills) a chunk's declared length before reading it, so a 3 KB file with a
    length field of 4 GB took 4 GB. Reads the 8-byte chunk headers only."""
    position = 8
    while position + 12 <= size:
        os.lseek(fd, position, os.SEEK_SET)
        head = os.read(fd, 8)
        if len(head) < 8:
            break
        length, kind = struct.unpack('>I4s', head)
        if length > size - position - 12:
            raise ValueError(f'PNG chunk {kind!r} declares {length} bytes, the file holds {size - position - 12} more')
        if kind == b'IEND':
            break
        position += 12 + length


def _decode(path, fd, header, keep_alpha=False):
    """Decode the open file `fd` to OpenCV's layout (gray (H, W), BGR (H, W, 3), or BGRA with
    `keep_alpha`), any depth, EXIF orientation ignored (as the masks are drawn). Gray and colour are
    decoded as such and alpha is dropped by the decoder itself, so no larger array than the result
    is allocated."""
    if keep_alpha:
        flags = cv2.IMREAD_UNCHANGED
    else:
        flags = (cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION
                 | (cv2.IMREAD_GRAYSCALE if header.channels <= 2 else cv2.IMREAD_COLOR))
    try:
        if _PROC_FD:  # an output array given: the binding returns OpenCV's own buffer, not a copy
            image = cv2.imread(f'/proc/self/fd/{fd}', np.empty(0, np.uint8), flags)
        else:
            image = cv2.imdecode(np.frombuffer(_read_start(fd, os.fstat(fd).st_size), np.uint8), flags)
    except cv2.error as e:
        raise ImageError(f'cannot decode {display_path(path)}: {_first_line(e)}') from None
    except MemoryError:
        raise ImageError(f'cannot decode {display_path(path)}: out of memory') from None
    except OSError as e:
        raise ImageError(f'cannot read {display_path(path)}: {e.strerror or e}') from None
    if image is None or image.size == 0:
        raise ImageError(f'cannot decode {display_path(path)}: not a readable image (corrupt or unsupported)')
    if image.shape[:2] != (header.height, header.width):  # the decoder disagrees with the header
        raise ImageError(f'cannot decode {display_path(path)}: header says {header.width}x{header.height}, '
                         f'decoded {image.shape[1]}x{image.shape[0]}')
    return image


def _first_line(error):
    lines = [line for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:200]


def _uint16_full_scale(image, bit_depth, path):
    """The value that maps to 255 for a 16-bit image under the bit-depth policy (see `load_view`),
    with a warning where the image does not fit the learnt depth."""
    if bit_depth is None or bit_depth >= 16:
        return 65535
    peak = int(image.max())
    if bit_depth <= 8:  # no 16-bit training image to learn from: this image's own range is the best guess
        guess = smallest_bit_depth(peak)
        logger.warning('%s is 16-bit but the training images were 8-bit: scaled as %d-bit (its largest value is '
                       '%d), its score may not compare', display_path(path), guess, peak)
        return (1 << guess) - 1
    full = (1 << bit_depth) - 1
    if peak > full:
        logger.warning('%s has values up to %d, above the %d-bit range (0..%d) learnt from the training images: '
                       'clipped, its score may not compare', display_path(path), peak, bit_depth, full)
    return full


def _to_uint8(image, full_scale):
    """Any decoded depth -> uint8 by the linear map 0..full_scale -> 0..255 (rounded, saturated):
    integers by `full_scale`, floats from [0, 1] (the convention of float TIFFs; NaN -> 0)."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return cv2.convertScaleAbs(image, alpha=255.0 / full_scale)
    if np.issubdtype(image.dtype, np.floating):
        return cv2.convertScaleAbs(np.clip(np.nan_to_num(image, nan=0.0), 0, 1), alpha=255.0)
    raise ImageError(f'unsupported pixel type {image.dtype}')


def _to_rgb(image):
    """uint8 gray or BGR (OpenCV's order) -> RGB (H, W, 3)."""
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def load_image(path, bit_depth=None, max_pixels=DEFAULT_MAX_PIXELS):
    """Decode an image file to RGB uint8 (H, W, 3): any bit depth, grayscale, RGB or RGBA (alpha is
    dropped: the product is what the camera saw).

    bit_depth: significant bits of 16-bit images (see `load_view`). max_pixels: larger images are
    refused from their header, before decoding. Raises ImageError.
    """
    with _checked(path, max_pixels) as (_, decode):
        image = decode()
        full_scale = _uint16_full_scale(image, bit_depth, path) if image.dtype == np.uint16 else None
        return _to_rgb(_to_uint8(image, full_scale))


def check_rgb_array(image):
    """An image given as an array: RGB uint8 (H, W, 3), or gray uint8 (H, W) made RGB; else ImageError."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ImageError(f'an image array must be uint8, got {getattr(image, "dtype", type(image).__name__)}')
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ImageError(f'an image array must be RGB (H, W, 3), got shape {image.shape}')
    return image


def check_mask_array(mask, image_shape):
    """A mask given as an array of the image's (H, W) -> bool (H, W): non-zero is defect."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.shape != tuple(image_shape[:2]):
        raise ImageError(f'mask array has shape {mask.shape}, its image is {tuple(image_shape[:2])}')
    return mask != 0


def load_view(path, resize_size, crop_size, bit_depth=None, max_pixels=DEFAULT_MAX_PIXELS):
    """The network's view of an image file, RGB uint8 (crop_size, crop_size, 3), and the image's (H, W).

    Equal to `network_view(load_image(path), ...)` up to rounding, for less work and memory: the
    image is resized in its decoded depth and converted to 8-bit RGB only as the small view.

    High bit depth policy: a 16-bit image holds `bit_depth` significant bits (a 12-bit camera
    writes 0..4095) and 0..2**bit_depth - 1 maps linearly onto 0..255, so it scores like the same
    picture in 8 bits. The Detector learns bit_depth from its training images (`learn_bit_depth`)
    and keeps it in the feature file. Values above the range are clipped, with a warning. bit_depth
    8 (training images all 8-bit): a 16-bit image is scaled by the smallest of 10, 12, 14, 16 bits
    that holds its largest value, with a warning. None: full-range 16-bit, no warning.
    """
    views, shape = load_views(path, [(resize_size, crop_size)], bit_depth, max_pixels)
    return views[0], shape


def load_views(path, geometries, bit_depth=None, max_pixels=DEFAULT_MAX_PIXELS, training_size=None):
    """`load_view` at several (resize_size, crop_size) geometries from one decoding -> ([view per
    geometry], the image's (H, W)); brought to training_size first (to_training_size)."""
    with _checked(path, max_pixels) as (_, decode):
        image = decode()
        full_scale = _uint16_full_scale(image, bit_depth, path) if image.dtype == np.uint16 else None
        shape = image.shape[:2]
        image = to_training_size(image, training_size)
        views = [network_view(image, resize_size, crop_size) for resize_size, crop_size in geometries]
        del image
    return [_to_rgb(_to_uint8(np.ascontiguousarray(view), full_scale)) for view in views], shape


HIGH_BIT_DEPTHS = (10, 12, 14, 16)


def learn_bit_depth(paths, max_pixels=DEFAULT_MAX_PIXELS):
    """The bit depth of the training images for `load_view`'s policy: 8 if none has more than 8 bits
    per sample, else the smallest of HIGH_BIT_DEPTHS that holds the largest value of the 16-bit ones.

    Only 16-bit images (known from their headers) are decoded; unreadable files are left to the
    caller's own loading, which reports them.
    """
    def peak(path):
        with _checked(path, max_pixels) as (header, decode):
            if header.bits != 16 or header.is_float:
                return None
            image = decode()
            return int(image.max()) if image.dtype == np.uint16 else None

    peaks = [value for batch in stream(paths, peak, batch_size=8)
             for _, value in batch if isinstance(value, int)]
    return smallest_bit_depth(max(peaks)) if peaks else 8


def smallest_bit_depth(peak):
    """The smallest of HIGH_BIT_DEPTHS whose range holds `peak`."""
    return next(bits for bits in HIGH_BIT_DEPTHS if peak < 1 << bits)


def load_mask(path, image_shape=None, max_pixels=DEFAULT_MAX_PIXELS):
    """Decode a ground-truth mask to bool (H, W).

    Defect = any non-zero pixel of the grey or colour channels. Alpha counts only for a mask whose
    colour channels are all zero and which has transparent pixels (a defect painted opaque on a
    transparent layer): then defect = alpha > 0. So an opaque RGBA mask, as image editors write
    it, reads like the same mask without alpha.
    image_shape: (H, W) of the image the mask belongs to; a mask of another size is an error.
    """
    with _checked(path, max_pixels, keep_alpha=True) as (_, decode):
        mask = decode()
        if mask.ndim == 3 and mask.shape[2] in (2, 4):
            colour, alpha = mask[..., :-1], mask[..., -1]
            defect = (colour != 0).any(axis=2)
            if not defect.any() and not alpha.all():
                defect = alpha != 0
        elif mask.ndim == 3:
            defect = (mask != 0).any(axis=2)
        else:
            defect = mask != 0
    if image_shape is not None and defect.shape != tuple(image_shape[:2]):
        raise ImageError(f'mask {display_path(path)} is {defect.shape[1]}x{defect.shape[0]} but its image is '
                         f'{image_shape[1]}x{image_shape[0]}')
    return defect


def find_mask(image_path, test_dir, gt_dir):
    """Path of the ground-truth mask of `image_path`, or None.

    The image's path relative to `test_dir` is looked up under `gt_dir` with the same stem, plain or
    with '_mask', in any image extension: `images/x.png` <-> `gt_masks/x.png` or `x_mask.png`, and
    MVTec's `test/crack/000.png` <-> `ground_truth/crack/000_mask.png`.
    """
    if not gt_dir or not os.path.isdir(gt_dir):
        return None
    relative = os.path.relpath(image_path, test_dir)
    if relative.startswith('..'):
        return None
    stem = os.path.splitext(relative)[0]
    for suffix in MASK_SUFFIXES:
        for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
            candidate = os.path.join(gt_dir, stem + suffix + ext)
            if os.path.isfile(candidate):
                return candidate
    return None


def short_side_shape(height, width, size):
    """(height, width) of an image of this shape once its shorter side is resized to `size`."""
    scale = size / min(height, width)
    return max(size, int(round(height * scale))), max(size, int(round(width * scale)))


def resize_short_side(image, size, interpolation=None):
    """Resize so that the shorter side is `size` pixels, keeping the aspect ratio (at most
    MAX_ASPECT_RATIO: ImageError beyond)."""
    h, w = image.shape[:2]
    if max(h, w) > MAX_ASPECT_RATIO * min(h, w):
        raise ImageError(f'a {w}x{h} image is longer than {MAX_ASPECT_RATIO} times its width')
    scale = size / min(h, w)
    new_h, new_w = short_side_shape(h, w, size)
    if (new_h, new_w) == (h, w):
        return image
    if interpolation is None:  # INTER_AREA is the alias-free choice when shrinking
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (new_w, new_h), interpolation=interpolation)


def training_size_shape(height, width, training_size):
    """(height, width) an image of this shape is brought to before its network views: the training
    images' size (training_size: (W, H), or None where they differ) where the image has their aspect
    ratio to within a pixel but another size; None where it is left as it is.

    Why: a resolution change alone moves the scores. Views made from a 900 px image are sharper than
    views made from a 320 px copy of it (MVTec bottle's test images against its downscaled training
    images: MahalanobisAD flagged 20 of 20 good test images at a 0.05 threshold, 2 of 20 with them
    brought to 320 px first; docs/thresholds.md), so every image is resampled along the training
    images' path. An image of another aspect ratio is left alone (it would be distorted): the Detector
    warns about it instead."""
    if training_size is None:
        return None
    train_width, train_height = training_size
    if (height, width) == (train_height, train_width):
        return None
    if abs(height * train_width / width - train_height) > 1 or abs(width * train_height / height - train_width) > 1:
        return None
    return train_height, train_width


def to_training_size(image, training_size):
    """The image resized to the training images' size where training_size_shape says so (INTER_AREA
    when shrinking, INTER_LINEAR when enlarging, as resize_short_side), else the image itself."""
    shape = training_size_shape(*image.shape[:2], training_size)
    if shape is None:
        return image
    interpolation = cv2.INTER_AREA if shape[0] < image.shape[0] else cv2.INTER_LINEAR
    return cv2.resize(image, shape[::-1], interpolation=interpolation)


def center_crop(image, size):
    h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return image[top:top + size, left:left + size]


def normalization(mean, std):
    """(scale (3,), offset (3,)) float32 with pixel * scale - offset = (pixel / 255 - mean) / std."""
    scale = 1.0 / (255.0 * np.asarray(std, np.float32))
    offset = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    return scale, offset


def to_tensor(image, mean, std):
    """RGB uint8 (S, S, 3) -> normalised float32 (3, S, S)."""
    scale, offset = normalization(mean, std)
    return (image.astype(np.float32) * scale - offset).transpose(2, 0, 1)


def resize_size_for(input_size):
    """The side the shorter image side is resized to before the centre crop to `input_size`: the
    ImageNet recipe's 0.875 crop (224 -> 256, 384 -> 439), at every input size."""
    return int(round(input_size / CROP_FRACTION))


def network_view(image, resize_size, crop_size):
    """What the network sees of an image: shorter side to resize_size, centre crop_size square."""
    return center_crop(resize_short_side(image, resize_size), crop_size)


def mask_view(mask, resize_size, crop_size):
    """The same geometry as `network_view`, for a bool mask (nearest neighbour)."""
    resized = resize_short_side(mask.astype(np.uint8), resize_size, cv2.INTER_NEAREST)
    return center_crop(resized, crop_size) > 0


def augment(image, rng, resize_size, crop_size, max_rotation=AUG_MAX_ROTATION_DEG):
    """A randomly rotated (uniform in +-max_rotation degrees) and randomly cropped network view of `image`.

    rng: np.random.Generator; the same generator state gives the same view.
    """
    return random_rotated_crop(resize_short_side(image, resize_size), rng, crop_size, max_rotation)


def random_rotated_crop(resized, rng, crop_size, max_rotation=AUG_MAX_ROTATION_DEG):
    """`augment` of an image already resized (resize_short_side): several copies share one resize."""
    h, w = resized.shape[:2]
    angle = rng.uniform(-max_rotation, max_rotation)
    rotation = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    rotated = cv2.warpAffine(resized, rotation, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    top, left = rng.integers(0, h - crop_size + 1), rng.integers(0, w - crop_size + 1)
    return rotated[top:top + crop_size, left:left + crop_size]


def check_rotation(degrees):
    """An augmentation's rotation range, a number of degrees in [0, 180] -> float; else UsageError."""
    try:
        value = None if isinstance(degrees, bool) else float(degrees)
    except (TypeError, ValueError):
        value = None
    if value is None or not 0 <= value <= 180:  # NaN fails both comparisons
        raise UsageError(f'aug_rotate must be a number of degrees in 0..180, got {degrees!r}')
    return value


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input, for one backbone and one fit, at one or more scales.

    input_sizes: the sides S of the square network views, one per scale, ascending: each view is the
    image with its shorter side resized to resize_size_for(S), centre-cropped to S (the same region of
    the image at every S, to within a pixel); an image is decoded once for all of them. mean, std: the
    backbone's normalisation; bit_depth: significant bits of 16-bit files (load_view's policy; None
    before a fit has learnt it); max_pixels: larger files are refused from their header; max_rotation:
    the augmentation's rotation range, degrees; training_size: (W, H) the fitted detector's training
    images share (None before a fit, or where they differ): an image of their aspect ratio and another
    size is brought to it first (to_training_size). Images are file paths or RGB uint8 arrays (H, W, 3)
    of any size. Masks and maps are in the geometry of the largest view (output_size).
    """
    input_sizes: tuple
    mean: tuple
    std: tuple
    bit_depth: int = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_rotation: float = AUG_MAX_ROTATION_DEG
    training_size: tuple = None

    @property
    def geometries(self):
        """[(resize_size, input_size)] per scale."""
        return [(resize_size_for(size), size) for size in self.input_sizes]

    @property
    def output_size(self):
        """Side of the largest view: the geometry of masks, maps and the view shown in figures."""
        return max(self.input_sizes)

    def views(self, image):
        """A path or an RGB uint8 array -> ([network view (S, S, 3) uint8 RGB per scale], the image's (H, W))."""
        if isinstance(image, np.ndarray):
            image = check_rgb_array(image)
            matched = to_training_size(image, self.training_size)
            return [network_view(matched, *geometry) for geometry in self.geometries], image.shape[:2]
        return load_views(os.fspath(image), self.geometries, self.bit_depth, self.max_pixels, self.training_size)

    def training_views(self, image, index, copies, seed):
        """All views of one training image, decoded once -> ([[the plain view, then `copies` augmented
        ones] per scale], its (H, W)). The augmented views are seeded per (seed, index, copy): the same
        views whatever the thread order."""
        if not copies:
            views, shape = self.views(image)
            return [[view] for view in views], shape
        image = (check_rgb_array(image) if isinstance(image, np.ndarray)
                 else load_image(os.fspath(image), self.bit_depth, self.max_pixels))
        shape, image = image.shape[:2], to_training_size(image, self.training_size)
        views = []
        for resize_size, size in self.geometries:
            resized = resize_short_side(image, resize_size)  # once for the plain view and every copy
            views.append([center_crop(resized, size)]
                         + [random_rotated_crop(resized, np.random.default_rng([seed, index, copy]), size,
                                                self.max_rotation) for copy in range(1, 1 + copies)])
        return views, shape

    def mask_view(self, mask, image_shape):
        """A mask path or bool array of the image's (H, W) -> (S, S) bool in the largest view's geometry.
        UsageError if it cannot be used: broken ground truth would bias the thresholds."""
        try:
            mask = (load_mask(os.fspath(mask), image_shape, self.max_pixels) if not isinstance(mask, np.ndarray)
                    else check_mask_array(mask, image_shape))
        except ImageError as e:
            raise UsageError(f'ground truth unusable: {e}') from None
        return mask_view(mask, resize_size_for(self.output_size), self.output_size)

    def tensors(self, views):
        """Views [(S, S, 3) uint8] of one scale -> the backbone's input (N, 3, S, S) float32, normalised."""
        return np.stack([to_tensor(view, self.mean, self.std) for view in views])


def stream(items, load, batch_size, workers=None):
    """Apply `load` to `items` in a thread pool; yield lists of (item, result) in order, batch_size long.

    result is `load(item)`, or the ImageError it raised. At most two batches are in flight, so
    memory stays flat in the number of items while decoding overlaps the caller's work (OpenCV
    releases the GIL while decoding and resizing).
    """
    workers = workers or thread_budget()
    items = iter(items)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        def submit():
            return [(item, pool.submit(_capture, load, item)) for item in itertools.islice(items, batch_size)]
        pending = submit()
        while pending:
            ahead = submit()
            yield [(item, future.result()) for item, future in pending]
            pending = ahead


def _capture(load, item):
    try:
        return load(item)
    except ImageError as e:
        return e
