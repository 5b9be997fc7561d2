"""Hostile and awkward files, class by class (issue 15): oversized images, decompression memory,
tampered feature files, odd file names, high bit depth, masks with alpha, file modes. The command
line's side of each class is in test_cli_hostile.py."""
import io
import json
import os
import struct
import subprocess
import sys
import time
import zipfile

import cv2
import numpy as np
import pytest

import anomaly_model
import feature_file
import file_io
import image_utils
import plot_utils
from errors import FeatureFileError
from image_utils import ImageError
from tests import hostile
from tests.conftest import REPO


def write(path, data):
    path.write_bytes(data)
    return str(path)


# ----------------------------------------------------------------------------------------------
# 1. Oversized images: refused from the header, before decoding, in every format
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('width, height', [(30000, 20000), (65535, 65535), (65535, 1025), (9000, 8000)])
def test_oversized_headers_are_refused_before_decoding(tmp_path, width, height):
    for name, data in hostile.oversized_headers(width, height).items():
        path = write(tmp_path / name, data)
        start = time.perf_counter()
        for load in (image_utils.load_image, image_utils.load_mask, lambda p: image_utils.load_view(p, 256, 224)):
            with pytest.raises(ImageError, match=f'{width}x{height} is {width * height} pixels, above --max_pixels'):
                load(path)
        assert time.perf_counter() - start < 1, name


@pytest.mark.parametrize('extension', ['.png', '.jpg', '.bmp', '.tif'])
def test_real_image_above_a_lowered_limit_is_refused_and_at_the_limit_accepted(tmp_path, extension):
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    path = write(tmp_path / f'x{extension}', hostile.encode(extension, image))
    with pytest.raises(ImageError, match='80x60 is 4800 pixels, above --max_pixels 4799'):
        image_utils.load_view(path, 32, 32, max_pixels=4799)
    assert image_utils.load_view(path, 32, 32, max_pixels=4800)[1] == (60, 80)


def test_header_reader_reports_size_depth_and_channels():
    rng = np.random.default_rng(1)
    images = hostile.base_images(rng)
    expected = {'rgb.png': ('PNG', 3, 8), 'rgba16.png': ('PNG', 4, 16), 'gray16.png': ('PNG', 1, 16),
                'rgb.jpg': ('JPEG', 3, 8), 'progressive.jpg': ('JPEG', 3, 8), 'gray.jpg': ('JPEG', 1, 8),
                'rgb16.tif': ('TIFF', 3, 16), 'float.tif': ('TIFF', 3, 32), 'rgba.bmp': ('BMP', 4, 8)}
    for name, (kind, channels, bits) in expected.items():
        header = image_utils.parse_header(images[name])
        assert (header.format, header.width, header.height, header.channels, header.bits) == \
            (kind, 64, 48, channels, bits), name
    assert image_utils.parse_header(images['float.tif']).is_float
    assert image_utils.parse_header(hostile.tiff_header_bytes(7, 9, big=True))[1:3] == (7, 9)
    for data in (b'', b'GIF89a' + b'\x00' * 40, b'\x76\x2f\x31\x01' + b'\x00' * 40, b'\x89PNG\r\n\x1a\n'):
        with pytest.raises(ValueError):  # unknown formats (OpenEXR here) never reach OpenCV's decoders
            image_utils.parse_header(data)


def test_extreme_aspect_ratios_are_refused_before_an_enormous_resize(tmp_path):
    path = write(tmp_path / 'strip.png', hostile.png_bytes(60000, 1, 8, 2))  # would resize to 15360000x256
    with pytest.raises(ImageError, match='60000x1 is longer than 1024 times its width'):
        image_utils.load_view(path, 256, 224)
    with pytest.raises(ImageError, match='a 1x2000 image is longer than 1024 times its width'):
        image_utils.network_view(np.zeros((2000, 1, 3), np.uint8), 256, 224)
    line = write(tmp_path / 'line.png', hostile.encode('.png', np.zeros((2, 2000, 3), np.uint8)))  # 1000:1 is fine
    assert image_utils.load_view(line, 256, 224)[0].shape == (224, 224, 3)


def test_png_chunk_longer_than_its_file_is_refused_before_opencv_allocates_it(tmp_path):
    """Found by the fuzz test: a 3 KB PNG whose IDAT length field reads 4 GB made OpenCV's reader
    allocate 4 GB before failing."""
    data = bytearray(hostile.encode('.png', np.zeros((48, 64), np.uint8)))
    at = data.index(b'IDAT') - 4
    data[at:at + 4] = struct.pack('>I', 0xFFFF0C3B)
    path = write(tmp_path / 'chunk.png', bytes(data))
    for load in (image_utils.load_image, image_utils.load_mask):
        with pytest.raises(ImageError, match=r"PNG chunk b'IDAT' declares 4294904891 bytes"):
            load(path)
    assert decode_peak_mb([path]) < 50


def test_pipes_devices_and_folders_named_like_images_are_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / 'pipe.png')
    os.symlink('/dev/zero', tmp_path / 'zero.png')
    (tmp_path / 'folder.png').mkdir()
    for name in ('pipe.png', 'zero.png', 'folder.png'):
        with pytest.raises(ImageError, match='not a regular file'):
            image_utils.load_view(str(tmp_path / name), 16, 16)


def test_a_file_too_large_for_any_image_within_the_limit_is_not_read(tmp_path):
    path = tmp_path / 'big.png'
    with open(path, 'wb') as f:
        f.write(hostile.png_bytes(10, 10))
        f.truncate(100 * 8 + image_utils.MAX_FILE_OVERHEAD + 1)
    with pytest.raises(ImageError, match='more than an image of --max_pixels 100 can need'):
        image_utils.load_image(str(path), max_pixels=100)


# ----------------------------------------------------------------------------------------------
# 2. Decoding memory: measured in a child process
# ----------------------------------------------------------------------------------------------

MEMORY_CHILD = '''
import sys, json
import image_utils
from tests.fuzz_child import peak_rss_mb
paths = sys.argv[1:]
before = peak_rss_mb()
if len(paths) == 1:
    try:
        image_utils.load_view(paths[0], 256, 224, max_pixels=10**8)
    except image_utils.ImageError:
        pass
else:
    batches = list(image_utils.stream(paths, lambda p: image_utils.load_view(p, 256, 224, max_pixels=10**8)[1], 2, 2))
    assert all(not isinstance(r, Exception) for b in batches for _, r in b), batches
print(json.dumps({'before_mb': before, 'peak_mb': peak_rss_mb()}))
'''


def decode_peak_mb(paths):
    result = subprocess.run([sys.executable, '-c', MEMORY_CHILD, *paths], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    return out['peak_mb'] - out['before_mb']


def test_16_bit_rgba_decoding_holds_at_most_6_bytes_a_pixel_and_large_decodes_take_turns(tmp_path):
    """The issue's bomb, scaled down: a 16-bit RGBA PNG of zeros, 4000 x 4000 (16 MP) in 0.3 MB.
    Before: 16-bit RGBA array + shifted copy + 8-bit array = 20 bytes a pixel (320 MB here)."""
    bomb = hostile.png_bomb(4000, 4000)
    path = write(tmp_path / 'bomb.png', bomb)
    assert os.path.getsize(path) < 1 << 20
    pixels_mb = 4000 * 4000 / 2**20
    single = decode_peak_mb([path])
    assert single < 6 * pixels_mb + 30, single   # the 16-bit RGB array, alpha dropped while decoding
    copy = write(tmp_path / 'bomb2.png', bomb)
    both = decode_peak_mb([path, copy])         # two decoding threads, one large image at a time
    assert both < 6 * pixels_mb + 40, both


# ----------------------------------------------------------------------------------------------
# 3. Tampered feature files
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(anomaly_model.METHODS))
def test_every_method_declares_exactly_the_state_it_saves(name):
    meta, method = hostile.fitted(name)
    declared, state = method.expected_state(), method.state()
    assert set(declared) == set(state)
    for key, array in state.items():
        shape, dtype = declared[key]
        assert array.dtype == np.dtype(dtype), key
        assert len(shape) == array.ndim and all(isinstance(n, str) or n == m for n, m in zip(shape, array.shape)), key


@pytest.mark.parametrize('name', list(anomaly_model.METHODS))
def test_every_method_round_trips(tmp_path, name):
    meta, method = hostile.fitted(name)
    path = write(tmp_path / 'f.pkl', hostile.feature_file_bytes(meta, method))
    _, (loaded,), _ = feature_file.load(path)
    maps = [np.random.default_rng(2).standard_normal((2,) + s).astype(np.float32) for s in hostile.SHAPES]
    np.testing.assert_array_equal(method.score(method.features(maps), 128)[0], loaded.score(loaded.features(maps), 128)[0])


def tampered(name='mahalanobis'):
    meta, method = hostile.fitted(name)
    return hostile.members(hostile.feature_file_bytes(meta, method))


TAMPERINGS = {
    'wrong-size precision': (lambda a: dict(a, image_precision_3=np.eye(7, dtype=np.float32)),
                             r'array image_precision_3 has shape \(7, 7\), the method needs \(10, 10\)'),
    'another method named': (lambda a: hostile.with_meta(a, method='padim'), 'padim parameters: levels None'),
    "another method's metadata": (lambda a: dict(a, meta=tampered('padim')['meta']),
                                  'unexpected members image_mean_0.npy, image_mean_1.npy.* for method padim'),
    'float64 array': (lambda a: dict(a, pixel_mean=a['pixel_mean'].astype(np.float64)),
                      'array pixel_mean is float64, the method needs float32'),
    'missing array': (lambda a: {k: v for k, v in a.items() if k != 'pixel_mean'}, 'missing arrays pixel_mean for method mahalanobis'),
    'NaN': (lambda a: dict(a, image_mean_0=np.full_like(a['image_mean_0'], np.nan)),
            'array image_mean_0 holds values that are not finite'),
    'fractional grid': (lambda a: hostile.with_meta(a, method_params=dict(
        json.loads(str(a['meta']))['method_params'], grid=4.0)), 'mahalanobis parameters: grid=4.0 is not a grid side'),
    'level out of range': (lambda a: hostile.with_meta(a, method_params=dict(
        json.loads(str(a['meta']))['method_params'], image_levels=[0, 9])), r'mahalanobis parameters: levels \[0, 9\] are not distinct'),
    'no feature shapes': (lambda a: hostile.with_meta(a, method_params=dict(
        json.loads(str(a['meta']))['method_params'], feature_shapes=None)), 'mahalanobis parameters: feature_shapes None'),
    'meta not an object': (lambda a: dict(a, meta=np.array('[1, 2]')), 'meta is not a JSON object'),
    'meta nested deep': (lambda a: dict(a, meta=np.array('[' * 100000)), 'meta is not JSON'),
    'text for numbers': (lambda a: dict(a, pixel_mean=np.array(['x'])), 'array pixel_mean is <U1'),
    'training rows out of order': (lambda a: dict(a, training_groups=np.array([0, 1, 2, 3, 4, 5, 7, 6])),
                                   r"the training rows' images \(8 rows\) are not 0 .. n_train_images - 1 in order"),
    'negative eigenvalue': (lambda a: dict(a, pixel_basis_values=-a['pixel_basis_values']),
                            "the Gaussians' basis of 8 rows with 8 vectors of 18 channels is not an eigenbasis"),
}


@pytest.mark.parametrize('case', list(TAMPERINGS))
def test_tampered_feature_file_is_one_damaged_line(tmp_path, case):
    change, message = TAMPERINGS[case]
    path = write(tmp_path / 'f.pkl', hostile.archive_bytes(change(tampered())))
    with pytest.raises(FeatureFileError, match='f.pkl: damaged feature file: ' + message) as error:
        feature_file.load(path)
    assert '\n' not in str(error.value)


def test_extra_member_bomb_is_refused_without_decompressing_it(tmp_path):
    """A 256 MB deflate bomb as an extra member (0.3 MB on disk): refused from the member list."""
    bomb = zipfile.ZipInfo('junk.npy')
    bomb.compress_type = zipfile.ZIP_DEFLATED
    path = tmp_path / 'f.pkl'
    path.write_bytes(hostile.archive_bytes(tampered()))
    with zipfile.ZipFile(path, 'a') as archive, archive.open(bomb, 'w', force_zip64=True) as member:
        block = b'\x00' * (1 << 24)
        for _ in range(16):
            member.write(block)
    assert os.path.getsize(path) < 1 << 20
    start = time.perf_counter()
    with pytest.raises(FeatureFileError, match='damaged feature file: unexpected members junk.npy'):
        feature_file.load(str(path))
    assert time.perf_counter() - start < 0.5


def test_member_whose_stored_size_disagrees_with_its_header_is_refused(tmp_path):
    """A header promising a (196, 6) float32 array over 8 bytes of data: refused before reading."""
    arrays = tampered()
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(arrays['pixel_mean']))
    short = header.getvalue() + b'\x00' * 8
    path = tmp_path / 'f.pkl'
    path.write_bytes(hostile.archive_bytes({k: v for k, v in arrays.items() if k != 'pixel_mean'},
                                           [('pixel_mean.npy', short, zipfile.ZIP_STORED)]))
    implied = len(header.getvalue()) + arrays['pixel_mean'].nbytes
    with pytest.raises(FeatureFileError, match=f'member pixel_mean stores {len(short)} bytes, its header implies '
                                               f'{implied}'):
        feature_file.load(str(path))


def test_feature_file_size_cap(tmp_path):
    meta, method = hostile.fitted('spade')
    path = write(tmp_path / 'f.pkl', hostile.feature_file_bytes(meta, method))
    with pytest.raises(FeatureFileError, match='damaged feature file: arrays of 0 MiB, above the limit'):
        feature_file.load(path, max_bytes=1000)


# ----------------------------------------------------------------------------------------------
# 4. Odd file names
# ----------------------------------------------------------------------------------------------

def test_names_that_are_not_utf8_are_read_and_shown_escaped(tmp_path):
    name = os.fsdecode(b'bad\xff\xfe name.png')
    path = str(tmp_path / name)
    cv2.imwrite(os.path.join(str(tmp_path), 'tmp.png'), np.zeros((8, 8, 3), np.uint8))
    os.rename(os.path.join(str(tmp_path), 'tmp.png'), path)
    assert image_utils.load_view(path, 8, 8)[1] == (8, 8)
    shown = image_utils.display_path(path)
    assert shown.endswith('bad\\xff\\xfe name.png')
    shown.encode('utf-8')  # valid UTF-8: no lone surrogates left
    with pytest.raises(ImageError) as error:
        image_utils.load_view(os.fsdecode(b'missing\xff.png'), 8, 8)
    str(error.value).encode('utf-8')
    figure = plot_utils.render_figure(np.zeros((32, 32, 3), np.uint8), None, None, 1.0, 2.0, None,
                                      title=path + ' \u00e9\u4e2d')
    assert figure.shape[0] > 0
    assert plot_utils.drawable(name + '\u4e2d') == 'bad\\xff\\xfe name.png?'


def test_long_names_are_shortened_deterministically_within_the_limit(tmp_path):
    for name in ('a' * 250 + '.png', '\u00e9' * 200 + '.png', os.fsdecode(b'\xff' * 300) + '.json'):
        path = file_io.fit_path(str(tmp_path / name))
        short = os.path.basename(path)
        assert len(os.fsencode(short)) <= 255 and short == os.path.basename(file_io.fit_path(str(tmp_path / name)))
        assert short.endswith(os.path.splitext(name)[1]) and short[:20] == name[:20]
        file_io.atomic_write_bytes(path, b'x')  # the temporary name fits too
    assert file_io.fit_path(str(tmp_path / 'short.png')) == str(tmp_path / 'short.png')
    assert file_io.shorten_name('b' * 300, 255) != file_io.shorten_name('b' * 299 + 'c', 255)
    file_io.atomic_write_bytes(str(tmp_path / ('c' * 255)), b'x')  # the longest name the system allows
    assert 'c' * 255 in os.listdir(tmp_path) and len(os.listdir(tmp_path)) == 4  # no temporary file left


# ----------------------------------------------------------------------------------------------
# 5. High bit depth
# ----------------------------------------------------------------------------------------------

def test_12_bit_image_in_16_bits_gives_the_8_bit_view(tmp_path):
    image = cv2.imread(os.path.join(REPO, 'images', 'good_000.png'))
    eight = write(tmp_path / 'eight.png', hostile.encode('.png', image))
    deep = write(tmp_path / 'deep.png', hostile.encode('.png', hostile.twelve_bit(image)))
    expected = image_utils.load_view(eight, 256, 224)[0].astype(int)
    assert np.abs(image_utils.load_view(deep, 256, 224, bit_depth=12)[0] - expected).max() <= 1
    assert np.abs(image_utils.load_image(deep, bit_depth=12) - image_utils.load_image(eight).astype(int)).max() == 0
    assert image_utils.load_view(deep, 256, 224)[0].max() <= 16  # without the policy: near black


def test_bit_depth_is_learnt_from_training_images(tmp_path):
    rng = np.random.default_rng(3)
    picture = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    eight = [write(tmp_path / f'e{i}.png', hostile.encode('.png', picture)) for i in range(2)]
    assert image_utils.learn_bit_depth(eight) == 8
    for bits, peak in ((10, 1000), (12, 4095), (12, 1100), (14, 9000), (16, 40000)):
        deep = write(tmp_path / f'd{bits}_{peak}.png', hostile.encode('.png', np.full((20, 30), peak, np.uint16)))
        assert image_utils.learn_bit_depth(eight + [deep]) == bits, (bits, peak)
    assert image_utils.learn_bit_depth(eight + [write(tmp_path / 'bad.png', b'junk')]) == 8  # left to the fit


def test_an_image_outside_the_learnt_range_is_warned_about(tmp_path, caplog):
    path = write(tmp_path / 'bright.png', hostile.encode('.png', np.full((20, 30), 9000, np.uint16)))
    image_utils.load_view(path, 16, 16, bit_depth=12)
    assert 'values up to 9000, above the 12-bit range (0..4095)' in caplog.text
    caplog.clear()
    view = image_utils.load_view(path, 16, 16, bit_depth=8)[0]
    assert 'the training images were 8-bit: scaled as 14-bit (its largest value is 9000)' in caplog.text
    assert view.max() == round(9000 * 255 / 16383)
    caplog.clear()
    image_utils.load_view(path, 16, 16, bit_depth=14)
    assert caplog.text == ''


# ----------------------------------------------------------------------------------------------
# 6. Masks with alpha
# ----------------------------------------------------------------------------------------------

def test_masks_colour_counts_alpha_only_for_a_colourless_layer(tmp_path):
    defect = np.zeros((20, 30), bool)
    defect[5:10, 10:20] = True
    white = np.where(defect, 255, 0).astype(np.uint8)
    opaque = np.full((20, 30), 255, np.uint8)
    cases = {
        'gray.png': white,
        'opaque_rgba.png': np.dstack([white, white, white, opaque]),          # what image editors write
        'opaque_rgba16.png': np.dstack([white, white, white, opaque]).astype(np.uint16) * 257,
        'red_rgba.png': np.dstack([np.zeros_like(white), np.zeros_like(white), white, opaque]),
        'alpha_drawn.png': np.dstack([np.zeros((20, 30, 3), np.uint8), white]),  # defect painted in alpha
        'gray_alpha_drawn.tif': np.dstack([np.zeros((20, 30, 3), np.uint8), white]),
    }
    for name, array in cases.items():
        path = write(tmp_path / name, hostile.encode(os.path.splitext(name)[1], array))
        np.testing.assert_array_equal(image_utils.load_mask(path), defect, name)
    black_opaque = write(tmp_path / 'black.png', hostile.encode('.png', np.dstack([np.zeros((20, 30, 3), np.uint8),
                                                                                   opaque])))
    assert not image_utils.load_mask(black_opaque).any()  # a good image stays good


# ----------------------------------------------------------------------------------------------
# 8. File modes follow the umask
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        path = str(tmp_path / 'out.json')
        file_io.atomic_write_bytes(path, b'{}')
        meta, method = hostile.fitted('mahalanobis')
        feature_file.save(str(tmp_path / 'f.pkl'), meta, [method])
        plot_utils.save_figure(str(tmp_path / 'fig.png'), np.zeros((16, 16, 3), np.uint8), None, None, 1.0, 2.0, None)
    finally:
        os.umask(previous)
    for name in ('out.json', 'f.pkl', 'fig.png'):
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode, name
