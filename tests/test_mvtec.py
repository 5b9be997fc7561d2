"""Accuracy on the real MVTec AD categories in ../shared (skipped where they are absent)."""
import json
import os

import pytest
from sklearn.metrics import roc_auc_score

import mahalanobisad
from tests.conftest import MVTEC


@pytest.mark.parametrize('category, minimum_auroc', [('bottle', 0.99), ('metal_nut', 0.90)])
def test_image_auroc_from_cli_scores(category, minimum_auroc, tmp_path, model_dir):
    root = os.path.join(MVTEC, category)
    if not os.path.isdir(root):
        pytest.skip(f'MVTec AD {category} not found at {root}')
    report = str(tmp_path / 'scores.json')
    code = mahalanobisad.run(['-tr', os.path.join(root, 'train', 'good'), '-f', str(tmp_path / 'f.pkl'),
                              '-i', os.path.join(root, 'test'), '--test_dir', os.path.join(root, 'test'),
                              '--gt_dir', os.path.join(root, 'ground_truth'), '--no_figures',
                              '--model_dir', model_dir, '--json', report])
    assert code == 0
    with open(report) as f:
        images = json.load(f)['images']
    labels = [os.sep + 'good' + os.sep not in image['path'] for image in images]
    assert len(images) == {'bottle': 83, 'metal_nut': 115}[category]
    assert roc_auc_score(labels, [image['score'] for image in images]) >= minimum_auroc
