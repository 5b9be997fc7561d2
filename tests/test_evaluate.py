import json
import os
import shutil

import numpy as np
import pytest

import evaluate
from tests.conftest import REPO


def test_aupro_hand_computed_case():
    # One row of 16 pixels: region A = pixels 0-1, region B = pixels 3-6, 10 normal pixels.
    mask = np.zeros((1, 1, 16), bool)
    mask[0, 0, [0, 1, 3, 4, 5, 6]] = True
    scores = np.zeros((1, 1, 16))
    scores[0, 0, :7] = [10, 9, 5, 8, 1, 1, 1]  # pixel 2 is a normal pixel scoring 5
    # (FPR, PRO) steps: (0, .25) (0, .5) (0, .625) (.1, .625) (.1, 1) (1, 1); the area up to
    # FPR 0.3 is 0.1 * 0.625 + 0.2 * 1 = 0.2625, normalised by 0.3 -> 0.875.
    assert evaluate.aupro(mask, scores) == pytest.approx(0.875)


def test_aupro_regions_count_equally_across_images():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2, :2] = True        # a 4-pixel region in image 0
    masks[1, 3, 3] = True          # a 1-pixel region in image 1
    maps = np.zeros((2, 4, 4))
    maps[0][masks[0]] = 1          # only the large region is found
    # PRO jumps to 0.5 at FPR 0 (one of two regions found), then rises linearly to 1 at FPR 1
    # (trapezoid rule, as in the MVTec AD code): PRO(0.3) = 0.65, area (0.5 + 0.65) / 2 * 0.3 / 0.3
    assert evaluate.aupro(masks, maps) == pytest.approx(0.575)
    assert evaluate.aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert evaluate.aupro(np.zeros((1, 3, 3), bool), np.zeros((1, 3, 3))) is None


def test_aupro_regions_touching_at_a_corner_are_one_region():
    """8-connectivity, as MVTec's evaluation code: two squares touching at a corner and a separate pixel
    are 2 regions, not 3."""
    mask = np.zeros((1, 6, 6), bool)
    mask[0, :2, :2] = mask[0, 2:4, 2:4] = True  # touching at a corner
    mask[0, 0, 5] = True                        # apart
    maps = np.zeros((1, 6, 6))
    maps[0, 0, 5] = 1                           # only the separate pixel is found
    # PRO 1/2 at FPR 0 (1/3 with 4-connected labels), then linear to 1 at FPR 1: (0.5 + 0.65) / 2
    assert evaluate.aupro(mask, maps) == pytest.approx(0.575)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    """Two MVTec-layout categories built from the sample data; 'nogt' has no ground_truth/."""
    root = tmp_path_factory.mktemp('data')
    train = sorted(f for f in os.listdir(os.path.join(REPO, 'train')) if f.endswith('.png'))[:12]
    for category in ('bottle', 'nogt'):
        for name in train:
            os.makedirs(root / category / 'train' / 'good', exist_ok=True)
            shutil.copy(os.path.join(REPO, 'train', name), root / category / 'train' / 'good' / name)
        for name in sorted(os.listdir(os.path.join(REPO, 'images'))):
            if not name.endswith('.png'):
                continue
            defect, number = name[:-4].rsplit('_', 1)
            os.makedirs(root / category / 'test' / defect, exist_ok=True)
            shutil.copy(os.path.join(REPO, 'images', name), root / category / 'test' / defect / f'{number}.png')
            if category == 'bottle' and defect != 'good':
                os.makedirs(root / category / 'ground_truth' / defect, exist_ok=True)
                shutil.copy(os.path.join(REPO, 'gt_masks', name[:-4] + '_mask.png'),
                            root / category / 'ground_truth' / defect / f'{number}_mask.png')
    return str(root)


def test_evaluate_outputs_and_determinism(dataset, tmp_path, model_dir):
    runs = []
    for name in ('a', 'b'):
        save = tmp_path / name
        rows = evaluate.main(['--data_path', dataset, '--save_path', str(save), '--model_dir', model_dir])
        runs.append(rows)
    rows = runs[0]
    assert [r['category'] for r in rows] == ['bottle', 'nogt', 'mean']
    with open(tmp_path / 'a' / 'metrics.json') as f:
        saved = json.load(f)
    assert saved == rows and list(saved[0]) == list(evaluate.METRIC_KEYS)
    bottle, nogt = rows[0], rows[1]
    assert bottle['image_auroc'] > 0.85 and bottle['pixel_auroc'] > 0.9 and 0.5 < bottle['aupro'] <= 1
    assert nogt['image_auroc'] == bottle['image_auroc'] and nogt['pixel_auroc'] is None and nogt['aupro'] is None
    assert bottle['fit_s'] > 0 and bottle['images_per_s'] > 0 and bottle['peak_mb'] > 0
    accuracy = ('image_auroc', 'pixel_auroc', 'aupro', 'image_f1')
    assert [[r[k] for k in accuracy] for r in runs[0]] == [[r[k] for k in accuracy] for r in runs[1]]
    files = set(os.listdir(tmp_path / 'a'))
    assert {'metrics.csv', 'bottle_image_roc.png', 'bottle_pixel_roc.png', 'nogt_image_roc.png',
            'bottle_best0.png', 'bottle_worst1.png'} <= files
    assert 'nogt_pixel_roc.png' not in files
    header = open(tmp_path / 'a' / 'metrics.csv').readline().strip()
    assert header == ','.join(evaluate.METRIC_KEYS)


def test_unknown_category_is_a_one_line_error(dataset, capsys):
    from cli import run_cli
    assert run_cli(evaluate.main, 'evaluate.py', ['--data_path', dataset, '--category', 'carpet']) == 1
    err = capsys.readouterr().err
    assert 'evaluate.py: error: no category carpet' in err and 'found: bottle, nogt' in err


def test_contaminate_plants_defects_and_reports_what_the_fit_left_out(dataset, tmp_path, model_dir):
    rows = evaluate.main(['--data_path', dataset, '--category', 'bottle', '--save_path', str(tmp_path),
                          '--model_dir', model_dir, '--contaminate', '0.2', '--contamination', '0.2',
                          '--fpr', '0.25'])
    bottle, mean = rows
    assert bottle['planted'] == 2 and bottle['excluded'] == 3  # round(0.2 * 12); round(0.2 * 14)
    assert 0 <= bottle['planted_excluded'] <= 2 and mean['planted'] == 2
    assert bottle['target_fpr'] == 0.25 and 0 <= bottle['test_fpr'] <= 1 and 0 <= bottle['test_recall'] <= 1
    assert bottle['test_map_fpr'] is not None
    train = evaluate.image_utils.list_images(os.path.join(dataset, 'bottle', 'train', 'good'))
    test_dir = os.path.join(dataset, 'bottle', 'test')
    test = evaluate.image_utils.list_images(test_dir)
    again = evaluate.plant_defects(train, test, test_dir, 0.2, 0)
    assert again == evaluate.plant_defects(train, test, test_dir, 0.2, 0)  # seeded
    planted = again[2]
    assert len(planted) == 2 and all(evaluate.is_defective(p, test_dir) for p in planted)
    assert not set(planted) & set(again[1]) and len(again[0]) == 14


def test_clean_baseline_withholds_the_planted_images_without_planting_them(dataset, tmp_path, model_dir, caplog,
                                                                          capsys):
    args = ['--data_path', dataset, '--category', 'bottle', '--model_dir', model_dir, '--method', 'padim',
            '--padim_dims', '50', '--contaminate', '0.2']
    caplog.set_level('INFO', logger='evaluate')
    contaminated = evaluate.main(args + ['--save_path', str(tmp_path / 'c')])[0]
    planted_log, _ = caplog.text, caplog.clear()
    baseline = evaluate.main(args + ['--save_path', str(tmp_path / 'b'), '--clean_baseline'])[0]
    test = evaluate.image_utils.list_images(os.path.join(dataset, 'bottle', 'test'))
    assert f'bottle: 14 train images, {len(test) - 2} test images' in planted_log and contaminated['planted'] == 2
    assert f'bottle: 12 train images, {len(test) - 2} test images' in caplog.text  # the same test set
    assert '2 defective test images withheld' in caplog.text
    assert baseline['planted'] == baseline['planted_excluded'] == baseline['excluded'] == 0
    capsys.readouterr()  # the runs' progress bars
    with pytest.raises(SystemExit):
        evaluate.parse_args(['--data_path', dataset, '--clean_baseline'])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and '--clean_baseline needs --contaminate' in err
