"""Postprocessing rules: plausible kidney components, tumors must touch a kidney."""

import numpy as np

from KidneyTumorSegLib.postprocessing import PostprocessSettings, postprocess


def _scene():
    labels = np.zeros((30, 40, 60), np.uint8)
    labels[5:25, 10:30, 5:20] = 1  # right kidney
    labels[5:25, 10:30, 40:55] = 1  # left kidney, with a tumor attached
    labels[10:16, 14:20, 55:58] = 2
    labels[1:3, 1:3, 28:30] = 1  # a speck of false kidney
    labels[26:29, 35:38, 28:31] = 2  # a tumor touching no kidney
    return labels


def test_specks_and_lonely_tumors_are_removed_and_kidneys_kept():
    labels = _scene()
    report = postprocess(labels)
    assert report.components_found == 4
    assert report.components_removed == 2
    assert report.voxels_removed == 8 + 27
    assert labels[1:3, 1:3, 28:30].max() == 0 and labels[26:29, 35:38, 28:31].max() == 0
    assert (labels[10:16, 14:20, 55:58] == 2).all()  # attached tumor kept
    assert (labels == 1).sum() == 2 * 20 * 20 * 15


def test_disabled_postprocessing_changes_nothing():
    labels = _scene()
    before = labels.copy()
    report = postprocess(labels, PostprocessSettings(enabled=False))
    assert np.array_equal(labels, before) and report.components_removed == 0


def test_a_single_kidney_with_a_large_tumor_survives():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:10, 2:10, 2:10] = 1
    labels[10:19, 2:12, 2:12] = 2  # tumor larger than the kidney, touching it
    before = labels.copy()
    postprocess(labels)
    assert np.array_equal(labels, before)


def test_empty_labels_are_left_alone():
    labels = np.zeros((5, 5, 5), np.uint8)
    assert postprocess(labels).components_found == 0
