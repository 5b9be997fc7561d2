import os

import cv2
import numpy as np
import pytest

import image_utils
from image_utils import ImageError


def write(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return str(path)


def test_list_images_recursive_sorted_and_joined_with_the_given_directory(tmp_path):
    for rel in ['b/2.png', 'b/1.jpg', 'a.bmp', 'c/d/e.tif']:
        write(tmp_path / rel, np.zeros((4, 4, 3), np.uint8))
    (tmp_path / 'notes.txt').write_text('x')
    found = image_utils.list_images(str(tmp_path))
    assert found == [os.path.join(str(tmp_path), r) for r in ['a.bmp', 'b/1.jpg', 'b/2.png', 'c/d/e.tif']]


@pytest.mark.parametrize('make, message', [
    (lambda p: str(p / 'missing'), 'no such file or directory'),
    (lambda p: str(p), 'no images'),
    (lambda p: (p / 'x.txt').write_text('x') and str(p / 'x.txt'), 'not an image file'),
])
def test_list_images_errors(tmp_path, make, message):
    with pytest.raises(ImageError, match=message):
        image_utils.list_images(make(tmp_path))


def test_load_image_any_depth_and_channels(tmp_path):
    rgb = np.zeros((5, 6, 3), np.uint8)
    rgb[..., 0] = 200  # red in RGB
    bgr = rgb[..., ::-1]
    cases = {
        'rgb.png': bgr,
        'rgba.png': np.dstack([bgr, np.full((5, 6), 7, np.uint8)]),
        'sixteen.png': bgr.astype(np.uint16) * 257,
        'gray.png': np.full((5, 6), 200, np.uint8),
        'gray16.tif': np.full((5, 6), 200 * 257, np.uint16),
        'ünïcode.jpg': bgr,
    }
    for name, array in cases.items():
        image = image_utils.load_image(write(tmp_path / name, array))
        assert image.shape == (5, 6, 3) and image.dtype == np.uint8, name
        assert abs(int(image[2, 2, 0]) - 200) <= 2, name
        if 'gray' not in name:
            assert image[2, 2, 1] <= 2 and image[2, 2, 2] <= 2, name  # channels in RGB order


def test_load_image_corrupt_and_empty(tmp_path):
    good = write(tmp_path / 'good.png', np.zeros((8, 8, 3), np.uint8))
    corrupt = tmp_path / 'corrupt.png'
    corrupt.write_bytes(open(good, 'rb').read()[:20])
    (tmp_path / 'empty.png').write_bytes(b'')
    for name in ('corrupt.png', 'empty.png'):
        with pytest.raises(ImageError, match='cannot decode'):
            image_utils.load_image(str(tmp_path / name))


def test_network_view_keeps_aspect_then_centre_crops():
    image = np.zeros((300, 600, 3), np.uint8)
    image[:, 290:310] = 255  # a bar at the horizontal centre
    resized = image_utils.resize_short_side(image, 256)
    assert resized.shape == (256, 512, 3)
    view = image_utils.network_view(image, 256, 224)
    assert view.shape == (224, 224, 3)
    columns = np.nonzero(view[112, :, 0] > 127)[0]
    assert abs(columns.mean() - 111.5) < 1.5  # still centred


def test_to_tensor_imagenet_normalisation():
    image = np.zeros((2, 2, 3), np.uint8)
    image[..., 1] = 255
    tensor = image_utils.to_tensor(image, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert tensor.shape == (3, 2, 2) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor[:, 0, 0], [-0.485 / 0.229, (1 - 0.456) / 0.224, -0.406 / 0.225], rtol=1e-6)


def test_augmentation_is_reproducible_and_varies():
    image = np.random.default_rng(0).integers(0, 255, (300, 320, 3), dtype=np.uint8)
    view = lambda seed: image_utils.augment(image, np.random.default_rng(seed), 256, 224)  # noqa: E731
    assert view(1).shape == (224, 224, 3)
    np.testing.assert_array_equal(view(1), view(1))
    assert not np.array_equal(view(1), view(2))
    assert not np.array_equal(view(1), image_utils.network_view(image, 256, 224))


def test_find_mask_flat_and_mvtec_layouts(tmp_path):
    mask = np.zeros((4, 4), np.uint8)
    write(tmp_path / 'gt/a.png', mask)
    write(tmp_path / 'gt/b_mask.png', mask)
    write(tmp_path / 'ground_truth/crack/000_mask.png', mask)
    find = image_utils.find_mask
    assert find(str(tmp_path / 'img/a.png'), str(tmp_path / 'img'), str(tmp_path / 'gt')) == str(tmp_path / 'gt/a.png')
    assert find(str(tmp_path / 'img/b.jpg'), str(tmp_path / 'img'), str(tmp_path / 'gt')) == str(tmp_path / 'gt/b_mask.png')
    assert find(str(tmp_path / 'img/c.png'), str(tmp_path / 'img'), str(tmp_path / 'gt')) is None
    assert (find(str(tmp_path / 'test/crack/000.png'), str(tmp_path / 'test'), str(tmp_path / 'ground_truth'))
            == str(tmp_path / 'ground_truth/crack/000_mask.png'))
    assert find(str(tmp_path / 'img/a.png'), str(tmp_path / 'img'), str(tmp_path / 'nowhere')) is None


def test_mask_size_must_match_its_image(tmp_path):
    path = write(tmp_path / 'm.png', np.full((4, 5), 255, np.uint8))
    assert image_utils.load_mask(path, (4, 5)).all()
    with pytest.raises(ImageError, match='5x4 but its image is 6x4'):
        image_utils.load_mask(path, (4, 6))


def test_mask_view_follows_image_geometry():
    mask = np.zeros((300, 600), bool)
    mask[:, 290:310] = True
    view = image_utils.mask_view(mask, 256, 224)
    assert view.dtype == bool and view.shape == (224, 224)
    assert abs(np.nonzero(view[112])[0].mean() - 111.5) < 1.5


def test_stream_keeps_order_and_returns_errors():
    def load(i):
        if i == 3:
            raise ImageError('bad 3')
        return i * 10
    batches = list(image_utils.stream(range(7), load, batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    pairs = [pair for b in batches for pair in b]
    assert [item for item, _ in pairs] == list(range(7))
    results = [result for _, result in pairs]
    assert results[:3] == [0, 10, 20] and isinstance(results[3], ImageError) and results[4:] == [40, 50, 60]


def test_load_view_equals_network_view_of_load_image(tmp_path):
    rng = np.random.default_rng(5)
    cases = {'bgr.png': rng.integers(0, 255, (300, 420, 3), dtype=np.uint8),
             'gray.png': rng.integers(0, 255, (300, 420), dtype=np.uint8),
             'bgra.png': rng.integers(0, 255, (300, 420, 4), dtype=np.uint8),
             'deep.png': rng.integers(0, 65535, (300, 420, 3), dtype=np.uint16)}
    for name, array in cases.items():
        path = write(tmp_path / name, array)
        view, shape = image_utils.load_view(path, 256, 224)
        assert shape == (300, 420), name
        expected = image_utils.network_view(image_utils.load_image(path), 256, 224)
        # 16-bit: resized before the conversion to 8 bits, so one level of rounding apart
        tolerance = 1 if array.dtype == np.uint16 else 0
        assert np.abs(view.astype(int) - expected).max() <= tolerance, name


def test_stream_reads_at_most_two_batches_ahead():
    pulled = []

    def items():
        for i in range(100):
            pulled.append(i)
            yield i
    batches = image_utils.stream(items(), lambda i: i, batch_size=4)
    first = next(batches)
    assert [item for item, _ in first] == [0, 1, 2, 3]
    assert len(pulled) <= 8  # memory stays flat in the number of inputs
    batches.close()
