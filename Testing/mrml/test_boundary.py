"""The pieces of the Slicer boundary, one by one: the LPS<->RAS conversion, volume nodes to images,
label files onto a volume's grid, segment terminology and colors, the parameter node."""

from __future__ import annotations

import types

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk

from KidneyTumorSegLib import mrml, selftests
from KidneyTumorSegLib.errors import KidneyTumorSegError
from KidneyTumorSegLib.phantom import make_phantom


def _rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def test_ijk_to_ras_flips_both_axes_and_origin_of_lps():
    matrix = mrml.ijk_to_ras_from_lps((10.0, 20.0, 30.0), (1.0, 2.0, 3.0), np.eye(3).ravel())
    expected = np.array([[-1, 0, 0, -10], [0, -2, 0, -20], [0, 0, 3, 30], [0, 0, 0, 1]], float)
    assert np.array_equal(matrix, expected)


@pytest.mark.parametrize("seed", range(5))
def test_lps_geometry_round_trips_through_ijk_to_ras(seed):
    rng = np.random.default_rng(seed)
    origin, spacing, direction = rng.uniform(-300, 300, 3), rng.uniform(0.4, 6.0, 3), _rotation(seed).ravel()
    back = mrml.lps_geometry_from_ijk_to_ras(mrml.ijk_to_ras_from_lps(origin, spacing, direction))
    assert np.allclose(back[0], origin) and np.allclose(back[1], spacing) and np.allclose(back[2], direction)


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "IPL", "oblique"])
def test_volume_nodes_loaded_by_slicer_convert_to_the_image_on_disk(scene, headless, tmp_path, orientation):
    path = tmp_path / f"{orientation}.nrrd"
    image = make_phantom(4, size=(20, 16, 8), spacing=(3.1, 2.3, 5.0), orientation=orientation, noise_hu=0).image
    sitk.WriteImage(image, str(path))
    context = selftests.SelfTestContext(scene, headless.volumes, headless.segmentations, None, tmp_path)
    volume = headless.volumes.AddArchetypeVolume(str(path), orientation, 0, None)
    selftests.check_volume_node_matches_file(context, path, volume)


def test_labels_off_the_volume_grid_are_refused(scene, headless, tmp_path):
    image = make_phantom(4, size=(20, 16, 8), spacing=(3.0, 3.0, 5.0), noise_hu=0).image
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    volume = headless.volumes.AddArchetypeVolume(str(tmp_path / "ct.nrrd"), "ct", 0, None)
    labels = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    labels.CopyInformation(image)
    sitk.WriteImage(labels, str(tmp_path / "same.nrrd"))
    assert mrml.read_labels_on_volume_grid(tmp_path / "same.nrrd", volume).shape == (8, 16, 20)
    labels.SetOrigin(tuple(np.add(image.GetOrigin(), (0.5, 0.0, 0.0))))
    sitk.WriteImage(labels, str(tmp_path / "shifted.nrrd"))
    with pytest.raises(KidneyTumorSegError, match="not on the grid of volume 'ct'"):
        mrml.read_labels_on_volume_grid(tmp_path / "shifted.nrrd", volume)


def test_an_empty_or_vector_volume_is_refused_with_a_message(scene):
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(KidneyTumorSegError, match="holds no voxels"):
        mrml.volume_node_to_image(empty)
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    image = vtk.vtkImageData()
    image.SetDimensions(4, 4, 4)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    vector.SetAndObserveImageData(image)
    with pytest.raises(KidneyTumorSegError, match="3 values per voxel"):
        mrml.volume_node_to_image(vector)


def test_terminology_written_out_equals_slicers_serializer(monkeypatch):
    with_slicer = mrml.terminology_entry(mrml.MORPHOLOGICALLY_ALTERED_STRUCTURE, mrml.NEOPLASM_CODE, mrml.KIDNEY_CODE)
    monkeypatch.delattr(slicer, "vtkSlicerTerminologiesModuleLogic")
    written_out = mrml.terminology_entry(mrml.MORPHOLOGICALLY_ALTERED_STRUCTURE, mrml.NEOPLASM_CODE, mrml.KIDNEY_CODE)
    assert written_out == with_slicer
    assert "~SCT^108369006^Neoplasm~" in with_slicer and "~SCT^64033007^Kidney~" in with_slicer


def test_segments_follow_the_label_values_of_the_command():
    from KidneyTumorSegLib.metrics import LABEL_NAMES

    assert [(s.label, s.name.lower()) for s in mrml.SEGMENTS] == sorted(LABEL_NAMES.items())


def test_segment_colors_are_the_quality_control_pictures_colors():
    from KidneyTumorSegLib.overlay import LABEL_COLORS

    assert {s.label: s.color_rgb255 for s in mrml.SPLIT_SEGMENTS} == LABEL_COLORS
    assert {s.label: s.color_rgb255 for s in mrml.SEGMENTS} == {k: LABEL_COLORS[k] for k in (1, 2)}


def test_split_segments_follow_the_split_label_values():
    from KidneyTumorSegLib.laterality import SPLIT_LABELS

    assert [(s.label, s.name.lower()) for s in mrml.SPLIT_SEGMENTS] == sorted(
        (k, v) for k, v in SPLIT_LABELS.items() if k
    )


def test_parameter_node_is_one_singleton_per_scene(scene):
    logic = mrml.KidneyTumorSegLogic(scene)
    first = logic.getParameterNode()
    assert first.GetAttribute("ModuleName") == "KidneyTumorSeg"
    assert logic.getParameterNode() is first
    assert mrml.KidneyTumorSegLogic(scene).getParameterNode() is first
    assert scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1


def test_logic_defaults_to_the_applications_scene(scene):
    assert mrml.KidneyTumorSegLogic().scene is slicer.mrmlScene


def test_starting_without_a_volume_says_what_to_select(scene):
    with pytest.raises(KidneyTumorSegError, match="select the CT"):
        mrml.KidneyTumorSegLogic(scene).startSegmentation(None)


def test_the_logic_imports_neither_torch_nor_qt():
    """Slicer's process must never hold GPU memory, and the logic runs without Qt."""
    import subprocess
    import sys

    code = (
        "import sys, KidneyTumorSegLib.mrml, KidneyTumorSegLib.process, KidneyTumorSegLib.environment, "
        "KidneyTumorSegLib.selftests; print(sorted(m for m in ('torch', 'qt', 'ctk') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


class _ThresholdingCommand:
    """A scripted stand-in for the segmentation command (through the logic's ``Launcher``): labels the CT
    it is given by thresholds (kidney above 150 HU, tumor above 400 HU) and reports success."""

    def launch(self, command, cwd, env):
        ct = sitk.ReadImage(command[command.index("predict") + 1])
        array = sitk.GetArrayFromImage(ct)
        labels = sitk.GetImageFromArray(((array > 150).astype(np.uint8) + (array > 400)).astype(np.uint8))
        labels.CopyInformation(ct)
        sitk.WriteImage(labels, command[command.index("-o") + 1])
        done = '{"event": "case_done", "volumes_ml": {}, "device": "scripted", "timings_s": {}}'
        return types.SimpleNamespace(
            stdout=iter([done + "\n"]), stderr=iter([]), wait=lambda timeout=None: 0, kill_tree=lambda: None
        )


def test_logic_brings_back_what_the_command_wrote_on_the_cts_voxels(scene, headless, tmp_path):
    """The whole round trip (volume node -> NRRD -> labels -> segments) without the network: the segments
    equal the thresholds applied to the file on disk, voxel for voxel."""
    path = tmp_path / "ct.nrrd"
    image = make_phantom(5, size=(30, 24, 10), spacing=(6.1, 5.3, 9.0), orientation="oblique", n_tumors=1).image
    sitk.WriteImage(image, str(path))
    volume = headless.volumes.AddArchetypeVolume(str(path), "ct", 0, None)
    logic = mrml.KidneyTumorSegLogic(scene, launcher=_ThresholdingCommand())
    result = logic.segment(volume, timeout=60)
    array = sitk.GetArrayFromImage(image)
    expected = (array > 150).astype(np.uint8) + (array > 400)
    assert expected.any() and (expected == 2).any()
    assert np.array_equal(logic.exportLabels(result.segmentation_node, volume), expected)
    assert result.status.device == "scripted"


@pytest.mark.parametrize("split", [False, True])
def test_a_seg_nrrd_written_by_the_command_opens_in_slicer_as_the_modules_segments(scene, headless, tmp_path, split):
    """``predict --seg-nrrd`` files, read by Slicer's own segmentation reader: the names, colours and
    terminology the module gives its segments, and the voxels on the CT's grid."""
    pytest.importorskip("slicerio")
    from KidneyTumorSegLib.exports import write_seg_nrrd

    image = make_phantom(4, size=(24, 20, 10), spacing=(3.1, 2.3, 5.0), orientation="oblique", noise_hu=0).image
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    volume = headless.volumes.AddArchetypeVolume(str(tmp_path / "ct.nrrd"), "ct", 0, None)
    array = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    array[2:8, 5:12, 3:9] = 1
    array[4:6, 7:10, 5:7] = 2
    array[2:8, 5:12, 14:20] = 3 if split else 1
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(image)
    write_seg_nrrd(labels, tmp_path / "ct.seg.nrrd")
    loaded = headless.segmentations.LoadSegmentationFromFile(str(tmp_path / "ct.seg.nrrd"), False)
    assert loaded is not None
    segmentation = loaded.GetSegmentation()
    specs = mrml.segment_specs(split)
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == [
        s.name for s in specs
    ]
    for spec in specs:
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(spec.name))
        assert np.allclose(segment.GetColor(), spec.color, atol=1e-4)
        assert segment.GetTerminology() == spec.terminology
    assert np.array_equal(mrml.KidneyTumorSegLogic(scene).exportLabels(loaded, volume), array)
