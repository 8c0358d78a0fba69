"""The module's logic end to end on the real Slicer core: a phantom CT loaded as a volume node, segmented
by the background command, the labels back as Kidney and Tumor segments.

Each test calls a function of ``KidneyTumorSegLib.selftests``, the same function the Slicer self-test
(``KidneyTumorSegTest``) calls inside the application.
"""

from __future__ import annotations

import pytest

from KidneyTumorSegLib import selftests


@pytest.fixture(scope="module")
def ctx(context_factory):
    context = context_factory("logic")
    yield context
    context.scene.Clear(0)


@pytest.fixture(scope="module")
def ct_path(ctx):
    return selftests.write_phantom_ct(ctx.workdir)


@pytest.fixture(scope="module")
def volume(ctx, ct_path):
    return selftests.load_ct_in_study(ctx, ct_path)


@pytest.fixture(scope="module")
def cli_labels(ctx, ct_path):
    """What a batch user gets for the same file."""
    return selftests.run_cli(ctx, ct_path, ctx.workdir / "cli-labels.nrrd")


@pytest.fixture(scope="module")
def result(ctx, volume):
    return selftests.segment_with_logic(ctx, volume)


def test_volume_node_geometry_round_trips_through_the_lps_ras_conversion(ctx, ct_path, volume):
    selftests.check_volume_node_matches_file(ctx, ct_path, volume)


def test_segments_equal_the_command_line_labels_voxel_for_voxel(ctx, result, volume, cli_labels):
    selftests.check_segments_equal_cli_labels(ctx, result, volume, cli_labels)


def test_segments_are_named_colored_and_coded(result):
    selftests.check_segment_names_colors_terminology(result.segmentation_node)


def test_closed_surfaces_exist_for_3d(result):
    selftests.check_closed_surfaces(result.segmentation_node)


def test_segmentation_and_table_land_in_the_ct_study(ctx, result, volume):
    selftests.check_in_ct_study(ctx, result.segmentation_node, volume)
    selftests.check_in_ct_study(ctx, result.table_node, volume)


def test_volumes_table_holds_millilitres_per_segment(result, cli_labels, volume):
    selftests.check_volumes_table(result, cli_labels, volume)


def test_seg_nrrd_save_and_reload_keeps_everything(ctx, result, volume):
    selftests.check_seg_nrrd_round_trip(ctx, result.segmentation_node, volume)


def test_overwriting_a_segmentation_replaces_its_segments_in_place(ctx, volume, cli_labels):
    selftests.check_overwrite_replaces_segments(ctx, volume, cli_labels)


def test_cancelled_run_leaves_the_scene_as_it_was(ctx, volume):
    selftests.check_cancel_leaves_scene_unchanged(ctx, volume)


def test_failing_command_surfaces_its_own_message(ctx, volume):
    selftests.check_failing_command_surfaces_its_message(ctx, volume)


def test_split_kidneys_gives_sided_segments_equal_to_the_command(ctx, ct_path, volume):
    selftests.check_split_kidneys(ctx, ct_path, volume)
