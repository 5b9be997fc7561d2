"""Images: finding, decoding, preprocessing, augmentation, ground-truth masks, batching.

An image becomes a network input here: `load_image` decodes any supported file to RGB uint8
(H, W, 3); `resize_short_side` + `center_crop` give the network's square view; `to_tensor`
normalises it to (3, S, S) float32. Masks get the same geometry, so a pixel of a map and of a
mask always refer to the same place.
"""
import concurrent.futures
import itertools
import os

import cv2
import numpy as np

# Parallelism is per image (see `stream`): OpenCV's own worker threads would only compete with it.
cv2.setNumThreads(1)

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
MASK_SUFFIXES = ('', '_mask')
AUG_MAX_ROTATION_DEG = 10.0


# Cores this process may use, where it shares a machine with others (score_archive's Dask workers set it).
THREADS_ENV = 'MAHALANOBISAD_THREADS'


def thread_budget():
    """The number of threads for decoding and the backbone: $MAHALANOBISAD_THREADS if it is a
    positive integer, else every core."""
    value = os.environ.get(THREADS_ENV, '')
    return int(value) if value.isdigit() and int(value) > 0 else os.cpu_count() or 1


class ImageError(ValueError):
    """An image or mask cannot be used; the message names the file and the reason."""


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
                raise ImageError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) found in directory {path}')
            found += in_dir
        elif os.path.isfile(path):
            if not is_image_file(path):
                raise ImageError(f'not an image file (expected {", ".join(IMAGE_EXTENSIONS)}): {path}')
            found.append(path)
        else:
            raise ImageError(f'no such file or directory: {path}')
    return found


def walk_images(directory):
    """Yield the image files under `directory`, lazily, in `list_images` order and form (the directory
    joined with each file's relative path): a listing of any size in constant memory."""
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        yield from (os.path.join(root, f) for f in sorted(files) if is_image_file(f))


def _decode(path, flags):
    try:
        data = np.fromfile(path, np.uint8)  # np.fromfile + imdecode also handles non-ASCII paths
    except OSError as e:
        raise ImageError(f'cannot read {path}: {e.strerror}') from None
    image = cv2.imdecode(data, flags) if data.size else None
    if image is None:
        raise ImageError(f'cannot decode {path}: not a readable image (corrupt or unsupported)')
    return image


def _to_uint8(image):
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):  # float TIFFs are conventionally in [0, 1]
        return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    raise ImageError(f'unsupported pixel type {image.dtype}')


def _to_rgb(image):
    """uint8 gray, BGR or BGRA (OpenCV's order) -> RGB (H, W, 3)."""
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:  # alpha is dropped: the product is what the camera saw
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def load_image(path):
    """Decode an image file to RGB uint8 (H, W, 3): any bit depth, grayscale, RGB or RGBA."""
    return _to_rgb(_to_uint8(_decode(path, cv2.IMREAD_UNCHANGED)))


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


def load_view(path, resize_size, crop_size):
    """`network_view(load_image(path), ...)` and the image's (H, W), for less work: the colour
    conversion runs on the small view (resizing is per channel, so the result is identical;
    it saves 2 ms of a 900 px image's 25)."""
    image = _to_uint8(_decode(path, cv2.IMREAD_UNCHANGED))
    return _to_rgb(network_view(image, resize_size, crop_size)), image.shape[:2]


def load_mask(path, image_shape=None):
    """Decode a ground-truth mask to bool (H, W): any non-zero pixel is defect.

    image_shape: (H, W) of the image the mask belongs to; a mask of another size is an error.
    """
    mask = _decode(path, cv2.IMREAD_UNCHANGED)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if image_shape is not None and mask.shape[:2] != tuple(image_shape[:2]):
        raise ImageError(f'mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image is '
                         f'{image_shape[1]}x{image_shape[0]}')
    return mask > 0


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


def resize_short_side(image, size, interpolation=None):
    """Resize so that the shorter side is `size` pixels, keeping the aspect ratio."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_w, new_h = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
    if (new_h, new_w) == (h, w):
        return image
    if interpolation is None:  # INTER_AREA is the alias-free choice when shrinking
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (new_w, new_h), interpolation=interpolation)


def center_crop(image, size):
    h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return image[top:top + size, left:left + size]


def to_tensor(image, mean, std):
    """RGB uint8 (S, S, 3) -> normalised float32 (3, S, S)."""
    scale = 1.0 / (255.0 * np.asarray(std, np.float32))
    offset = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    return (image.astype(np.float32) * scale - offset).transpose(2, 0, 1)


def network_view(image, resize_size, crop_size):
    """What the network sees of an image: shorter side to resize_size, centre crop_size square."""
    return center_crop(resize_short_side(image, resize_size), crop_size)


def mask_view(mask, resize_size, crop_size):
    """The same geometry as `network_view`, for a bool mask (nearest neighbour)."""
    resized = resize_short_side(mask.astype(np.uint8), resize_size, cv2.INTER_NEAREST)
    return center_crop(resized, crop_size) > 0


def augment(image, rng, resize_size, crop_size):
    """A randomly rotated (+-10 deg) and randomly cropped network view of `image`.

    rng: np.random.Generator; the same generator state gives the same view.
    """
    resized = resize_short_side(image, resize_size)
    h, w = resized.shape[:2]
    angle = rng.uniform(-AUG_MAX_ROTATION_DEG, AUG_MAX_ROTATION_DEG)
    rotation = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    rotated = cv2.warpAffine(resized, rotation, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    top, left = rng.integers(0, h - crop_size + 1), rng.integers(0, w - crop_size + 1)
    return rotated[top:top + crop_size, left:left + crop_size]


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
