"""KiTS19 Dice against the official definition; volumes."""

import numpy as np
import pytest

from KidneyTumorSegLib.metrics import dice, kits19_dice, label_volumes_ml


def official_kits19(prediction, gt):
    """The official evaluation's arithmetic, written out independently (NaN when both are empty)."""
    out = []
    for threshold in (0, 1):
        p, g = prediction > threshold, gt > threshold
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(2 * np.logical_and(p, g).sum() / (p.sum() + g.sum()))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_dice_equals_official_definition_on_random_label_maps(seed):
    rng = np.random.default_rng(seed)
    pred = rng.choice([0, 1, 2], size=(20, 30, 25), p=[0.7, 0.2, 0.1]).astype(np.uint8)
    ref = rng.choice([0, 1, 2], size=(20, 30, 25), p=[0.6, 0.3, 0.1]).astype(np.uint8)
    result = kits19_dice(pred, ref)
    kidney, tumor = official_kits19(pred, ref)
    assert result["kidney_dice"] == pytest.approx(kidney, abs=1e-12)
    assert result["tumor_dice"] == pytest.approx(tumor, abs=1e-12)
    assert result["composite_dice"] == pytest.approx((kidney + tumor) / 2)


def test_kidney_dice_counts_tumor_as_kidney():
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[1:3, 1:3, 1:3] = 2
    pred = ref.copy()
    pred[pred == 2] = 1  # all tumor called kidney: kidney Dice perfect, tumor Dice zero
    result = kits19_dice(pred, ref)
    assert result["kidney_dice"] == 1.0
    assert result["tumor_dice"] == 0.0


def test_both_empty_gives_one_and_is_reported():
    empty = np.zeros((3, 3, 3), np.uint8)
    kidney_only = empty.copy()
    kidney_only[1, 1, 1] = 1
    result = kits19_dice(kidney_only, kidney_only)
    assert result["tumor_dice"] == 1.0 and result["both_empty"] == ["tumor"]
    assert np.isnan(official_kits19(kidney_only, kidney_only)[1])  # what the official code would say
    assert kits19_dice(kidney_only, empty)["kidney_dice"] == 0.0


def test_dice_is_symmetric_and_bounded():
    rng = np.random.default_rng(1)
    a, b = rng.random((10, 10, 10)) > 0.5, rng.random((10, 10, 10)) > 0.3
    assert dice(a, b) == dice(b, a)
    assert 0.0 <= dice(a, b) <= 1.0
    assert dice(a, a) == 1.0


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="same shape"):
        kits19_dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_volumes_use_voxel_size_in_millilitres():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:5] = 1
    labels[5:6] = 2
    volumes = label_volumes_ml(labels, (2.0, 1.0, 0.5))  # 1 mm^3 per voxel
    assert volumes == {"kidney": pytest.approx(0.5), "tumor": pytest.approx(0.1)}
