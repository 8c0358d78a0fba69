"""Checks of the Slicer boundary, shared by the pytest suite and the Slicer self-test.

``Testing/mrml`` runs these functions on ``slicer-core`` (the real MRML and segmentation libraries,
headless); ``KidneyTumorSegTest`` in ``KidneyTumorSeg.py`` runs the very same functions inside the Slicer
application. Everything they need comes in a ``SelfTestContext``: the scene, the module logics, a model
file and a scratch folder.

The test CT is a phantom written by SimpleITK (an independent writer) with an oblique direction and
unequal spacing, and loaded by Slicer's own volume reader, so a swapped axis or an LPS/RAS slip fails.
Imports ``slicer``, ``vtk``, numpy and SimpleITK, never Qt or torch.
"""

from __future__ import annotations

import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from .mrml import (
    ANATOMIC_CONTEXT,
    KIDNEY_CODE,
    LEFT_CODE,
    NEOPLASM_CODE,
    RIGHT_CODE,
    SEGMENTS,
    SPLIT_SEGMENTS,
    TERMINOLOGY_CONTEXT,
    KidneyTumorSegLogic,
    RunOptions,
    SegmentationResult,
    ijk_to_ras_from_lps,
    ijk_to_ras_of,
    segment_ids_by_label,
    volume_node_to_image,
)
from .process import RunState, SegmentationRunError, child_environment

# A small phantom (80 x 64 x 24 voxels) with one tumor: seconds on a CPU. Unequal spacing and an
# oblique direction, so that a swapped axis or a sign slip changes the result.
PHANTOM_SEED = 1
PHANTOM_ARGS = {"orientation": "oblique", "spacing": (4.6, 4.4, 6.0), "size": (80, 64, 24), "n_tumors": 1}


def check(condition: bool, message: str) -> None:
    """``assert`` that survives ``python -O`` and says what was expected."""
    if not condition:
        raise AssertionError(message)


@dataclass
class SelfTestContext:
    scene: slicer.vtkMRMLScene
    volumes_logic: slicer.vtkSlicerVolumesLogic
    segmentations_logic: slicer.vtkSlicerSegmentationsModuleLogic
    model_path: Path | None  # None: the registry's default model
    workdir: Path
    device: str = "cpu"
    python: str = field(default_factory=lambda: sys.executable)
    timeout_s: float = 900.0

    def logic(self) -> KidneyTumorSegLogic:
        return KidneyTumorSegLogic(self.scene, python=self.python)

    def options(self, **changes) -> RunOptions:
        model = None if self.model_path is None else str(self.model_path)
        return RunOptions(**{"model": model, "device": self.device, **changes})


# ----------------------------------------------------------------------------------- a headless Slicer


def headless_slicer() -> types.SimpleNamespace:
    """Slicer's core without the application (``slicer-core``): a scene, an application logic with the
    default colors, and the Volumes, Segmentations and Subject Hierarchy logics, registered the way the
    application registers them. ``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()`` are set for
    the ``slicer.util`` helpers that look them up. Create one per process: every Segmentations logic
    registers the converter rules again."""
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = app.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app.SetModuleLogic("Colors", colors)  # the volumes logic gives new volumes a color table through it
    logics = {}
    for name, logic_class in (
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
    ):
        logic = logic_class()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)  # the Segmentations logic registers its converter rules here
        app.SetModuleLogic(name, logic)
        logics[name] = logic
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(
        **{name.lower(): types.SimpleNamespace(logic=lambda logic=logic: logic) for name, logic in logics.items()}
    )
    return types.SimpleNamespace(
        scene=scene,
        app=app,
        volumes=logics["Volumes"],
        segmentations=logics["Segmentations"],
        subject_hierarchy=logics["SubjectHierarchy"],
    )


# ---------------------------------------------------------------------------------------------- setup


def write_phantom_ct(folder: Path, name: str = "phantom-ct.nrrd") -> Path:
    """The test CT, written by SimpleITK."""
    from .phantom import make_phantom

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    sitk.WriteImage(make_phantom(PHANTOM_SEED, **PHANTOM_ARGS).image, str(path), True)
    return path


def load_ct_in_study(ctx: SelfTestContext, path: Path, name: str = "Phantom CT") -> slicer.vtkMRMLScalarVolumeNode:
    """Load the CT with Slicer's reader and put it in a patient's study in the subject hierarchy."""
    volume = ctx.volumes_logic.AddArchetypeVolume(str(path), name, 0, None)
    check(volume is not None, f"{path}: Slicer's volume reader failed")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(ctx.scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Phantom patient")
    study = hierarchy.CreateStudyItem(patient, "Phantom study")
    item = hierarchy.GetItemByDataNode(volume)
    if item == hierarchy.GetInvalidItemID():
        hierarchy.CreateItem(study, volume)
    else:
        hierarchy.SetItemParent(item, study)
    return volume


def run_cli(ctx: SelfTestContext, ct_path: Path, labels_path: Path, *extra: str) -> np.ndarray:
    """The labels the command writes for a file, run as batch users run it."""
    return run_cli_with_model(ctx, ctx.model_path, ct_path, labels_path, *extra)


def run_cli_with_model(
    ctx: SelfTestContext, model_path: Path | None, ct_path: Path, labels_path: Path, *extra: str
) -> np.ndarray:
    """``run_cli`` with another model (None: the registry's default, the bundled demo model)."""
    command = [ctx.python, "-m", "KidneyTumorSegLib", "predict", str(ct_path), "-o", str(labels_path)]
    if model_path is not None:
        command += ["--model", str(model_path)]
    command += ["--device", ctx.device, "--progress", "none", *extra]
    done = subprocess.run(  # noqa: S603
        command, capture_output=True, text=True, env=child_environment(), timeout=ctx.timeout_s, check=False
    )
    check(done.returncode == 0, f"the command failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path)))


def segment_with_logic(
    ctx: SelfTestContext, volume: slicer.vtkMRMLScalarVolumeNode, output: slicer.vtkMRMLSegmentationNode | None = None
) -> SegmentationResult:
    return ctx.logic().segment(volume, ctx.options(), output, timeout=ctx.timeout_s)


def count_nodes(scene: slicer.vtkMRMLScene, class_name: str = "vtkMRMLNode") -> int:
    return scene.GetNumberOfNodesByClass(class_name)


# --------------------------------------------------------------------------------------------- checks


def check_volume_node_matches_file(ctx: SelfTestContext, ct_path: Path, volume: slicer.vtkMRMLScalarVolumeNode) -> None:
    """Slicer's reader and SimpleITK agree on the geometry through our LPS<->RAS conversion, both ways."""
    on_disk = sitk.ReadImage(str(ct_path))
    expected = ijk_to_ras_from_lps(on_disk.GetOrigin(), on_disk.GetSpacing(), on_disk.GetDirection())
    found = ijk_to_ras_of(volume)
    check(np.allclose(found, expected, atol=1e-6), f"IJK-to-RAS of the node\n{found}\n!= from the file\n{expected}")
    back = volume_node_to_image(volume)
    check(back.GetSize() == on_disk.GetSize(), f"size {back.GetSize()} != {on_disk.GetSize()}")
    check(np.allclose(back.GetOrigin(), on_disk.GetOrigin(), atol=1e-6), "origin differs after the round trip")
    check(np.allclose(back.GetSpacing(), on_disk.GetSpacing(), atol=1e-9), "spacing differs after the round trip")
    check(np.allclose(back.GetDirection(), on_disk.GetDirection(), atol=1e-9), "direction differs after the round trip")
    check(
        np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(on_disk)),
        "voxels differ after the round trip",
    )


def check_segments_equal_cli_labels(
    ctx: SelfTestContext,
    result: SegmentationResult,
    volume: slicer.vtkMRMLScalarVolumeNode,
    cli_labels: np.ndarray,
) -> None:
    """The segments, exported on the CT's grid, are voxel for voxel the labels the command writes."""
    logic = ctx.logic()
    exported = logic.exportLabels(result.segmentation_node, volume)
    check(exported.shape == cli_labels.shape, f"shape {exported.shape} != the command's {cli_labels.shape}")
    differ = int(np.count_nonzero(exported != cli_labels))
    check(differ == 0, f"{differ} voxels differ from the labels the command wrote")
    check(bool(np.any(cli_labels > 0)), "the command found nothing: the comparison would prove little")
    nodes_before = {ctx.scene.GetNthNode(i).GetID() for i in range(ctx.scene.GetNumberOfNodes())}
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    ctx.scene.AddNode(labelmap)
    try:
        ids = vtk.vtkStringArray()
        for segment_id in segment_ids_by_label(result.segmentation_node).values():
            ids.InsertNextValue(segment_id)
        slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            result.segmentation_node, ids, labelmap, volume
        )
        check(
            np.allclose(ijk_to_ras_of(labelmap), ijk_to_ras_of(volume), atol=1e-9),
            "the exported labelmap's IJK-to-RAS differs from the CT's",
        )
    finally:  # the labelmap, its display node and the color table the export made
        added = [ctx.scene.GetNthNode(i) for i in range(ctx.scene.GetNumberOfNodes())]
        for node in [n for n in added if n.GetID() not in nodes_before]:
            ctx.scene.RemoveNode(node)


def check_segment_names_colors_terminology(segmentation_node: slicer.vtkMRMLSegmentationNode) -> None:
    segmentation = segmentation_node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    check(names == [s.name for s in SEGMENTS], f"segments {names}, expected {[s.name for s in SEGMENTS]}")
    for spec in SEGMENTS:
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(spec.name))
        color = segment.GetColor()
        check(np.allclose(color, spec.color, atol=1e-6), f"{spec.name}: color {color}, expected {spec.color}")
        entry = slicer.vtkSlicerTerminologyEntry()
        check(
            slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(segment.GetTerminology(), entry),
            f"{spec.name}: terminology {segment.GetTerminology()!r} cannot be read",
        )
        # Slicer 5.8 renamed "anatomic" to "region"; the old names still work, with a warning.
        region_context = getattr(entry, "GetRegionContextName", None) or entry.GetAnatomicContextName
        region = (getattr(entry, "GetRegionObject", None) or entry.GetAnatomicRegionObject)()
        check(entry.GetTerminologyContextName() == TERMINOLOGY_CONTEXT, f"{spec.name}: terminology context")
        check(region_context() == ANATOMIC_CONTEXT, f"{spec.name}: anatomic context")
        type_ = entry.GetTypeObject()
        expected_type = KIDNEY_CODE if spec.name == "Kidney" else NEOPLASM_CODE
        found_type = (type_.GetCodingSchemeDesignator(), type_.GetCodeValue(), type_.GetCodeMeaning())
        check(found_type == expected_type, f"{spec.name}: type {found_type}, expected {expected_type}")
        if spec.name == "Tumor":
            found_region = (region.GetCodingSchemeDesignator(), region.GetCodeValue(), region.GetCodeMeaning())
            check(found_region == KIDNEY_CODE, f"Tumor: anatomic region {found_region}, expected {KIDNEY_CODE}")


def check_closed_surfaces(segmentation_node: slicer.vtkMRMLSegmentationNode) -> None:
    """3D: every non-empty segment has a non-empty closed surface."""
    name = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    segmentation = segmentation_node.GetSegmentation()
    check(bool(segmentation.ContainsRepresentation(name)), "no closed-surface representation")
    for spec in SEGMENTS:
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(spec.name))
        surface = segment.GetRepresentation(name)
        labelmap = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
        scalars = labelmap.GetPointData().GetScalars() if labelmap is not None else None
        filled = scalars is not None and scalars.GetRange()[1] > 0
        if filled:
            check(surface is not None and surface.GetNumberOfPoints() > 0, f"{spec.name}: empty closed surface")


def check_in_ct_study(ctx: SelfTestContext, node: slicer.vtkMRMLNode, volume: slicer.vtkMRMLScalarVolumeNode) -> None:
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(ctx.scene)
    study = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(volume))
    item = hierarchy.GetItemByDataNode(node)
    check(item != hierarchy.GetInvalidItemID(), f"{node.GetName()} is not in the subject hierarchy")
    check(hierarchy.GetItemParent(item) == study, f"{node.GetName()} is not in the CT's study")


def check_volumes_table(
    result: SegmentationResult, cli_labels: np.ndarray, volume: slicer.vtkMRMLScalarVolumeNode
) -> None:
    """The table holds each segment's volume in mL: voxel count times voxel volume, as the command reports."""
    spacing = np.linalg.norm(ijk_to_ras_of(volume)[:3, :3], axis=0)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    table = result.table_node.GetTable()
    rows = {table.GetValue(r, 0).ToString(): table.GetValue(r, 1).ToDouble() for r in range(table.GetNumberOfRows())}
    check(list(rows) == [s.name for s in SEGMENTS], f"table rows {list(rows)}")
    for spec in SEGMENTS:
        expected = int(np.count_nonzero(cli_labels == spec.label)) * voxel_ml
        check(
            abs(rows[spec.name] - expected) < 1e-3,
            f"{spec.name}: {rows[spec.name]} mL in the table, expected {expected}",
        )
    if result.status is not None and result.status.volumes_ml:
        for spec in SEGMENTS:
            reported = result.status.volumes_ml[spec.name.lower()]
            check(abs(rows[spec.name] - reported) < 2e-3, f"{spec.name}: table {rows[spec.name]} != command {reported}")


def check_seg_nrrd_round_trip(
    ctx: SelfTestContext, segmentation_node: slicer.vtkMRMLSegmentationNode, volume: slicer.vtkMRMLScalarVolumeNode
) -> None:
    """Save as .seg.nrrd and load again: names, colors, terminology, voxels and geometry survive."""
    path = ctx.workdir / "round-trip.seg.nrrd"
    storage = slicer.vtkMRMLSegmentationStorageNode()
    ctx.scene.AddNode(storage)
    storage.SetFileName(str(path))
    check(bool(storage.WriteData(segmentation_node)), f"{path}: could not be written")
    ctx.scene.RemoveNode(storage)
    loaded = ctx.segmentations_logic.LoadSegmentationFromFile(str(path), False)
    check(loaded is not None, f"{path}: could not be loaded")
    try:
        original, reloaded = segmentation_node.GetSegmentation(), loaded.GetSegmentation()
        check(reloaded.GetNumberOfSegments() == original.GetNumberOfSegments(), "segment count changed")
        for index in range(original.GetNumberOfSegments()):
            a, b = original.GetNthSegment(index), reloaded.GetNthSegment(index)
            check(a.GetName() == b.GetName(), f"name {a.GetName()!r} -> {b.GetName()!r}")
            check(np.allclose(a.GetColor(), b.GetColor(), atol=1e-6), f"{a.GetName()}: color changed")
            check(a.GetTerminology() == b.GetTerminology(), f"{a.GetName()}: terminology changed")
        logic = ctx.logic()
        check(
            np.array_equal(logic.exportLabels(loaded, volume), logic.exportLabels(segmentation_node, volume)),
            "voxels changed in the round trip",
        )
        matrices = []
        for node in (segmentation_node, loaded):
            labelmap = slicer.vtkOrientedImageData()
            node.GetBinaryLabelmapRepresentation(node.GetSegmentation().GetNthSegmentID(0), labelmap)
            matrix = vtk.vtkMatrix4x4()
            labelmap.GetImageToWorldMatrix(matrix)
            matrices.append(np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]))
        check(np.allclose(matrices[0], matrices[1], atol=1e-6), "labelmap geometry changed in the round trip")
        check(np.allclose(matrices[1], ijk_to_ras_of(volume), atol=1e-6), "reloaded labelmap is off the CT's grid")
    finally:
        ctx.scene.RemoveNode(loaded.GetDisplayNode())
        ctx.scene.RemoveNode(loaded)


def check_overwrite_replaces_segments(
    ctx: SelfTestContext, volume: slicer.vtkMRMLScalarVolumeNode, cli_labels: np.ndarray
) -> None:
    """Overwriting a selected segmentation replaces its segments in place: the same node, its old
    segments gone, no other segmentation node; a rerun reuses its volumes table."""
    target = slicer.vtkMRMLSegmentationNode()
    target.SetName("Segmentation to overwrite")
    ctx.scene.AddNode(target)
    target.CreateDefaultDisplayNodes()
    target.GetSegmentation().AddEmptySegment("", "Old segment")
    nodes_before = count_nodes(ctx.scene)
    segmentations_before = count_nodes(ctx.scene, "vtkMRMLSegmentationNode")
    result = segment_with_logic(ctx, volume, target)
    check(result.segmentation_node is target, "a new segmentation node was created instead of overwriting")
    check(count_nodes(ctx.scene, "vtkMRMLSegmentationNode") == segmentations_before, "segmentation nodes added")
    check(count_nodes(ctx.scene) == nodes_before + 1, "more nodes than the volumes table were added")
    check_segment_names_colors_terminology(target)  # the old segment is gone: exactly Kidney, Tumor
    check_segments_equal_cli_labels(ctx, result, volume, cli_labels)
    logic = ctx.logic()
    check(logic.updateVolumesTable(target) is result.table_node, "a rerun made a second volumes table")
    check(count_nodes(ctx.scene) == nodes_before + 1, "updating the volumes table added nodes")


def check_cancel_leaves_scene_unchanged(ctx: SelfTestContext, volume: slicer.vtkMRMLScalarVolumeNode) -> None:
    """A cancelled run adds nothing to the scene and removes its temporary folder."""
    before = count_nodes(ctx.scene)
    segmentations_before = count_nodes(ctx.scene, "vtkMRMLSegmentationNode")
    task = ctx.logic().startSegmentation(volume, ctx.options())
    workdir = task.run.workdir
    check(workdir.is_dir(), "no temporary folder while running")
    time.sleep(0.3)  # the command is still starting (importing torch takes longer): cancel cannot come late
    check(task.poll().state == RunState.RUNNING, f"state {task.state} before cancel")
    task.cancel()
    check(task.state == RunState.CANCELLED, f"state {task.state} after cancel")
    exit_code = task.run.status().exit_code
    check(exit_code is not None and exit_code != 0, f"the command was not killed (exit status {exit_code})")
    check(count_nodes(ctx.scene) == before, "the cancelled run changed the number of nodes")
    check(count_nodes(ctx.scene, "vtkMRMLSegmentationNode") == segmentations_before, "a partial segmentation remains")
    check(not workdir.exists(), f"{workdir}: temporary folder left behind")


def check_failing_command_surfaces_its_message(ctx: SelfTestContext, volume: slicer.vtkMRMLScalarVolumeNode) -> None:
    """A corrupt model file: the error is the command's own one-line message, and nothing is left behind."""
    corrupt = ctx.workdir / "corrupt-model.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00this is not a model file at all")
    before = count_nodes(ctx.scene)
    logic = ctx.logic()
    task = logic.startSegmentation(volume, ctx.options(model=str(corrupt)))
    workdir = task.run.workdir
    status = task.wait(ctx.timeout_s)
    check(status.state == RunState.FAILED, f"state {status.state}, expected failed")
    message = task.error
    check(message.startswith(f"{corrupt}: "), f"not the command's message about the model file: {message!r}")
    check("safetensors" in message and "Traceback" not in message, f"unexpected message: {message!r}")
    check(count_nodes(ctx.scene) == before, "the failed run changed the scene")
    check(not workdir.exists(), f"{workdir}: temporary folder left behind")
    try:
        logic.segment(volume, ctx.options(model=str(corrupt)), timeout=ctx.timeout_s)
    except SegmentationRunError as exc:
        check(str(exc) == message, f"segment() raised {exc!r}, the run said {message!r}")
    else:
        raise AssertionError("segment() did not raise on a corrupt model file")


def check_split_kidneys(ctx: SelfTestContext, ct_path: Path, volume: slicer.vtkMRMLScalarVolumeNode) -> None:
    """ "Separate left and right kidney", with the bundled demo model (so that both kidneys are found):
    "Kidney, right", "Tumor", "Kidney, left" with side modifiers in their terminology, voxel for voxel the
    command's ``--split-kidneys`` labels, and each kidney on the patient's side in RAS."""
    cli = run_cli_with_model(ctx, None, ct_path, ctx.workdir / "cli-split.nrrd", "--split-kidneys")
    options = ctx.options(model=None, split_kidneys=True, report=True)
    result = ctx.logic().segment(volume, options, timeout=ctx.timeout_s)
    node = result.segmentation_node
    try:
        segmentation = node.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        check(names == [s.name for s in SPLIT_SEGMENTS], f"segments {names}")
        for spec, side in ((SPLIT_SEGMENTS[0], RIGHT_CODE), (SPLIT_SEGMENTS[2], LEFT_CODE)):
            entry = slicer.vtkSlicerTerminologyEntry()
            segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(spec.name))
            check(
                slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(segment.GetTerminology(), entry),
                f"{spec.name}: terminology cannot be read",
            )
            type_, modifier = entry.GetTypeObject(), entry.GetTypeModifierObject()
            check(type_.GetCodeValue() == KIDNEY_CODE[1], f"{spec.name}: type {type_.GetCodeValue()}")
            check(modifier.GetCodeValue() == side[1], f"{spec.name}: modifier {modifier.GetCodeValue()}, not {side}")
        exported = ctx.logic().exportLabels(node, volume)
        differ = int(np.count_nonzero(exported != cli))
        check(differ == 0, f"{differ} voxels differ from the command's --split-kidneys labels")
        ijk_to_ras = ijk_to_ras_of(volume)
        ras_x = {}
        for value in (1, 3):
            kji = np.argwhere(exported == value)
            check(kji.size > 0, f"label {value}: no voxel; both kidneys should be found in the phantom")
            centroid_ijk = kji[:, ::-1].mean(axis=0)
            ras_x[value] = float((ijk_to_ras[:3, :3] @ centroid_ijk + ijk_to_ras[:3, 3])[0])
        check(ras_x[1] > 0 > ras_x[3], f"RAS x of the right kidney {ras_x[1]:.0f}, left {ras_x[3]:.0f} mm")
        volumes = ctx.logic().segmentVolumes(node)
        check(list(volumes) == [s.name for s in SPLIT_SEGMENTS], f"volumes of {list(volumes)}")
        check_measurements_table(result, exported, volume)
    finally:
        for table in (result.table_node, result.measurements_table):
            if table is not None:
                ctx.scene.RemoveNode(table)
        ctx.scene.RemoveNode(node.GetDisplayNode())
        ctx.scene.RemoveNode(node)


def check_measurements_table(
    result: SegmentationResult, labels: np.ndarray, volume: slicer.vtkMRMLScalarVolumeNode
) -> None:
    """The command's measurements reached a table: one row per tumor, volumes that add up to the tumor
    segment's, the R.E.N.A.L. parts filled in and N marked as not computed."""
    check(result.measurements is not None and result.measurements_table is not None, "no measurements table")
    table = result.measurements_table.GetTable()
    tumors = result.measurements["tumors"]
    check(table.GetNumberOfRows() == len(tumors), f"{table.GetNumberOfRows()} rows for {len(tumors)} tumors")
    voxel_ml = float(np.prod(np.linalg.norm(ijk_to_ras_of(volume)[:3, :3], axis=0))) / 1000.0
    tumor_ml = int(np.count_nonzero(labels == 2)) * voxel_ml
    table_ml = sum(table.GetValueByName(r, "Volume [mL]").ToDouble() for r in range(table.GetNumberOfRows()))
    check(abs(table_ml - tumor_ml) < 0.01 + 1e-3 * tumor_ml, f"tumor volumes {table_ml} mL, segment {tumor_ml} mL")
    for row in range(table.GetNumberOfRows()):
        check(table.GetValueByName(row, "Side").ToString() in ("left", "right"), "tumor side missing")
        check(table.GetValueByName(row, "R").ToString() in ("1", "2", "3"), "R missing")
        check(table.GetValueByName(row, "N").ToString() == "not computed", "N should say not computed")


def run_all(ctx: SelfTestContext, log=print) -> None:
    """Every check in order, as the Slicer self-test runs them (pytest runs them one by one)."""
    ct_path = write_phantom_ct(ctx.workdir)
    volume = load_ct_in_study(ctx, ct_path)
    log("volume node geometry")
    check_volume_node_matches_file(ctx, ct_path, volume)
    log("command-line reference labels")
    cli_labels = run_cli(ctx, ct_path, ctx.workdir / "cli-labels.nrrd")
    log("segmentation through the module logic")
    result = segment_with_logic(ctx, volume)
    check_segments_equal_cli_labels(ctx, result, volume, cli_labels)
    check_segment_names_colors_terminology(result.segmentation_node)
    check_closed_surfaces(result.segmentation_node)
    check_in_ct_study(ctx, result.segmentation_node, volume)
    check_volumes_table(result, cli_labels, volume)
    log(".seg.nrrd round trip")
    check_seg_nrrd_round_trip(ctx, result.segmentation_node, volume)
    log("overwrite")
    check_overwrite_replaces_segments(ctx, volume, cli_labels)
    log("cancel")
    check_cancel_leaves_scene_unchanged(ctx, volume)
    log("failing command")
    check_failing_command_surfaces_its_message(ctx, volume)
    log("left and right kidney")
    check_split_kidneys(ctx, ct_path, volume)
