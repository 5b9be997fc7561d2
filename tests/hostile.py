"""Hostile and awkward files for the tests: crafted headers, decompression bombs, seeded mutations of
valid images and feature files. Everything is built here, deterministically, from a seed."""
import io
import json
import struct
import zipfile
import zlib

import cv2
import numpy as np

import anomaly_model
import feature_file
import image_utils

# A backbone of input 128 with outputs of stride 4..32, small enough to fit every method in milliseconds.
SHAPES = [(4, 32, 32), (6, 16, 16), (8, 8, 8), (10, 4, 4)]
INPUT_SIZE = 128


def png_chunk(kind, payload):
    return struct.pack('>I', len(payload)) + kind + payload + struct.pack('>I', zlib.crc32(kind + payload))


def png_bytes(width, height, bit_depth=8, colour_type=2, rows=None):
    """A PNG with the given header; its image data is `rows` (filtered scanlines, raw bytes) or a
    single empty scanline (a header that promises more than the file holds)."""
    header = struct.pack('>IIBBBBB', width, height, bit_depth, colour_type, 0, 0, 0)
    data = zlib.compress(rows if rows is not None else b'\x00' * 16)
    return b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', header) + png_chunk(b'IDAT', data) + png_chunk(b'IEND', b'')


def png_bomb(width, height, bit_depth=16, colour_type=6):
    """A real, all-zero PNG of width x height (16-bit RGBA by default) compressed to a few MB:
    the scanlines are generated and compressed row by row, never held whole."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b'\x00' * (1 + width * channels * bit_depth // 8)
    compressor = zlib.compressobj(9)
    data = b''.join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack('>IIBBBBB', width, height, bit_depth, colour_type, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + png_chunk(b'IHDR', header) + png_chunk(b'IDAT', data) + png_chunk(b'IEND', b'')


def twelve_bit(image):
    """The same picture as a 12-bit camera writes it into a 16-bit file: 0..255 -> 0..4095."""
    return np.round(image.astype(np.float64) * 4095 / 255).astype(np.uint16)


def jpeg_header_bytes(width, height, components=3):
    """A JPEG whose frame header (SOF0) declares width x height, after an APP0 segment; no scan data."""
    app0 = b'\xff\xe0' + struct.pack('>H', 16) + b'JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00'
    sof = b'\xff\xc0' + struct.pack('>HBHHB', 8 + 3 * components, 8, height, width, components)
    sof += b''.join(bytes([i + 1, 0x11, 0]) for i in range(components))
    return b'\xff\xd8' + app0 + sof + b'\xff\xd9'


def bmp_header_bytes(width, height, bits=24):
    info = struct.pack('<IiiHHIIiiII', 40, width, height, 1, bits, 0, 0, 2835, 2835, 0, 0)
    return b'BM' + struct.pack('<IHHI', 14 + len(info) + 64, 0, 0, 14 + len(info)) + info + b'\x00' * 64


def tiff_header_bytes(width, height, bits=16, samples=3, big=False):
    """A little-endian TIFF (or BigTIFF) whose first directory declares the size; one tiny strip."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, bits), (259, 3, 1), (262, 3, 2 if samples >= 3 else 1),
            (273, 4, 0), (277, 3, samples), (278, 4, height), (279, 4, 16)]
    if big:
        head = b'II+\x00' + struct.pack('<HHQ', 8, 0, 16)
        entries = b''.join(struct.pack('<HHQQ', tag, 16 if kind == 4 else kind, 1, value)
                           for tag, kind, value in tags)
        return head + struct.pack('<Q', len(tags)) + entries + struct.pack('<Q', 0) + b'\x00' * 16
    head = b'II*\x00' + struct.pack('<I', 8)
    entries = b''.join(struct.pack('<HHII', tag, kind, 1, value) for tag, kind, value in tags)
    return head + struct.pack('<H', len(tags)) + entries + struct.pack('<I', 0) + b'\x00' * 16


def oversized_headers(width, height):
    """{name: bytes} of a file in every format whose header declares width x height."""
    return {'huge.png': png_bytes(width, height, 16, 6), 'huge.jpg': jpeg_header_bytes(width, height),
            'huge.bmp': bmp_header_bytes(width, height), 'huge_top_down.bmp': bmp_header_bytes(width, -height),
            'huge.tif': tiff_header_bytes(width, height), 'huge_big.tif': tiff_header_bytes(width, height, big=True)}


def encode(extension, array, params=()):
    ok, data = cv2.imencode(extension, array, list(params))
    assert ok, extension
    return data.tobytes()


def base_images(rng, size=(48, 64)):
    """{name: bytes}: valid small images in every supported format, depth and channel layout."""
    h, w = size
    colour = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    deep = colour.astype(np.uint16) * 257
    alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
    return {
        'rgb.png': encode('.png', colour), 'gray.png': encode('.png', colour[..., 0]),
        'rgba.png': encode('.png', np.concatenate([colour, alpha], axis=2)),
        'rgb16.png': encode('.png', deep), 'gray16.png': encode('.png', deep[..., 0]),
        'rgba16.png': encode('.png', np.concatenate([deep, alpha.astype(np.uint16) * 257], axis=2)),
        'rgb.jpg': encode('.jpg', colour), 'gray.jpg': encode('.jpg', colour[..., 0]),
        'progressive.jpg': encode('.jpg', colour, (cv2.IMWRITE_JPEG_PROGRESSIVE, 1)),
        'rgb.tif': encode('.tif', colour), 'rgb16.tif': encode('.tif', deep),
        'float.tif': encode('.tif', colour.astype(np.float32) / 255),
        'gray16.tif': encode('.tif', deep[..., 0]),
        'rgb.bmp': encode('.bmp', colour), 'rgba.bmp': encode('.bmp', np.concatenate([colour, alpha], axis=2)),
        'gray.bmp': encode('.bmp', colour[..., 0]),
    }


def mutate(data, rng):
    """A seeded corruption of `data`: flipped bytes (in the header or anywhere), a cut, inserted or
    deleted bytes, a duplicated span, or large numbers written over the header's fields."""
    data = bytearray(data)
    kind = rng.integers(7)
    if kind == 0:  # a few bytes of the header
        for _ in range(rng.integers(1, 6)):
            data[rng.integers(min(len(data), 64))] = rng.integers(256)
    elif kind == 1:  # anywhere
        for _ in range(rng.integers(1, 20)):
            data[rng.integers(len(data))] = rng.integers(256)
    elif kind == 2:
        data = data[:rng.integers(1, len(data))]
    elif kind == 3:
        at = rng.integers(len(data))
        data[at:at] = rng.integers(0, 256, rng.integers(1, 64), dtype=np.uint8).tobytes()
    elif kind == 4:
        at = rng.integers(len(data))
        del data[at:at + rng.integers(1, 64)]
    elif kind == 5:
        at, length = rng.integers(len(data)), rng.integers(1, 256)
        data[at:at] = data[at:at + length]
    else:  # a 16- or 32-bit field of the header set to something large
        at = rng.integers(min(len(data) - 4, 48))
        value = int(rng.choice([0xFFFF, 0x7FFF, 0xFFFFFFFF, 0x7FFFFFFF, 0x10000, 0]))
        data[at:at + 4] = struct.pack('>I' if rng.integers(2) else '<I', value)
    return bytes(data)


# ----------------------------------------------------------------------------------------------
# Feature files
# ----------------------------------------------------------------------------------------------

def fitted(name, seed=0):
    """A method fitted on random maps of SHAPES (milliseconds) and its metadata."""
    rng = np.random.default_rng(seed)
    method = anomaly_model.make_method(name, padim_dims=12, spade_k=3, coreset_ratio=0.25)
    method.configure(SHAPES, INPUT_SIZE)
    maps = [rng.standard_normal((8,) + shape).astype(np.float32) for shape in SHAPES]
    features = method.fit(method.features(maps)).features(maps)
    if method.keeps_training:  # as Detector.fit leaves a Gaussian: its held-out distances' basis and rows kept
        method.holdout_scores(features, np.arange(8), INPUT_SIZE)
        method.keep_training(features, np.arange(8))
    return {'backbone': 'synthetic', 'input_size': INPUT_SIZE, 'resize_size': image_utils.resize_size_for(INPUT_SIZE),
            'n_train_images': 8, 'bit_depth': 8, 'holdout_scores': [0.5, 1.0],
            'holdout_thresholds': {'image': 1.0, 'pixel': 1.0},
            'thresholds': {'image': 1.5, 'pixel': 2.0, 'source': 'test'}}, method


def feature_file_bytes(meta, method):
    buffer = io.BytesIO()
    header = dict(meta, format=feature_file.FEATURE_FILE_FORMAT, version=feature_file.FEATURE_FILE_VERSION,
                  method=method.name, method_params=method.params)
    np.savez(buffer, meta=np.array(json.dumps(header)), **feature_file.arrays(method))
    return buffer.getvalue()


def members(data):
    """{name without .npy: array} of a valid feature file (for tampering)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def archive_bytes(arrays, extra=()):
    """An .npz of `arrays` plus raw `extra` members [(name, bytes, compress_type)]."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with zipfile.ZipFile(buffer, 'a') as archive:
        for name, payload, compression in extra:
            archive.writestr(zipfile.ZipInfo(name), payload, compress_type=compression)
    return buffer.getvalue()


def with_meta(arrays, **changes):
    """`arrays` with the JSON metadata changed: changes' values replace keys, None removes them."""
    meta = json.loads(str(arrays['meta']))
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return dict(arrays, meta=np.array(json.dumps(meta)))


def mutate_feature_file(data, rng):
    """A seeded tampering of a valid feature file: raw byte damage, or a structurally valid archive
    whose members, shapes, dtypes, values or metadata do not fit each other."""
    arrays = members(data)
    meta = json.loads(str(arrays['meta']))
    state = [k for k in arrays if k != 'meta' and arrays[k].size]  # an empty array has no value to damage
    kind = rng.integers(13)
    key = state[rng.integers(len(state))]
    if kind <= 2:
        return mutate(data, rng)
    if kind == 3:  # an array of another shape
        array = arrays[key]
        return archive_bytes(dict(arrays, **{key: np.zeros(tuple(n + 1 for n in array.shape), array.dtype)}))
    if kind == 4:  # another dtype
        return archive_bytes(dict(arrays, **{key: arrays[key].astype(np.float64)}))
    if kind == 5:  # a missing array
        return archive_bytes({k: v for k, v in arrays.items() if k != key})
    if kind == 6:  # an extra member, sometimes a deflate bomb
        payload = b'\x00' * int(rng.choice([16, 1 << 20, 64 << 20]))
        return archive_bytes(arrays, [('junk.npy', payload, zipfile.ZIP_DEFLATED)])
    if kind == 7:  # metadata naming another method
        other = [m for m in anomaly_model.METHODS if m != meta['method']]
        return archive_bytes(with_meta(arrays, method=str(rng.choice(other))))
    if kind == 8:  # a method parameter changed or removed
        params = dict(meta['method_params'])
        param = sorted(params)[rng.integers(len(params))]
        params[param] = [None, -1, 0, 10 ** 9, 2.5, 'x', [], [[1, 2]]][rng.integers(8)]
        return archive_bytes(with_meta(arrays, method_params=params))
    if kind == 9:  # not-a-number values
        array = arrays[key].copy()
        array.flat[rng.integers(array.size)] = np.nan
        return archive_bytes(dict(arrays, **{key: array}))
    if kind == 10:  # metadata that is not what the tool writes
        text = [json.dumps([1, 2]), '{"format": ', '[' * 100000, json.dumps(dict(meta, version='3'))][rng.integers(4)]
        return archive_bytes(dict(arrays, meta=np.array(text)))
    if kind == 11:
        return archive_bytes(dict(arrays, **{key: np.array([str(key)])}))  # text where numbers belong
    field = ['bit_depth', 'n_train_images', 'holdout_thresholds', 'thresholds', 'holdout_scores'][rng.integers(5)]
    value = [None, 13, -1, 'x', [], {}, {'image': float('nan')}, {'image': 1.0, 'pixel': 'x', 'source': 2},
             [float('inf')], 1e308 * 10][rng.integers(10)]
    return archive_bytes(with_meta(arrays, **{field: value if value is not None else 'null'}))
