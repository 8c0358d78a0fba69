"""The Slicer boundary: volume nodes to images, label files to segmentation nodes, and the module's logic.

Imports ``slicer`` (MRML), ``vtk``, numpy and SimpleITK, never Qt and never torch: the same code runs in
the Slicer application and under pytest on ``slicer-core``. The network runs in a child process (see
``process.py``), so Slicer's process never holds GPU memory.

Geometry: SimpleITK (and every file) works in LPS, Slicer in RAS. ``ijk_to_ras_from_lps`` and
``lps_geometry_from_ijk_to_ras`` are the only place where one becomes the other; everything else here
goes through them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from . import segments
from .errors import KidneyTumorSegError
from .postprocessing import TUMOR
from .process import (
    BackgroundPrediction,
    Launcher,
    PredictionRequest,
    RunState,
    RunStatus,
    SegmentationCancelledError,
    SegmentationRunError,
)
from .segments import (  # noqa: F401 - re-exported: the Slicer self-test and its callers import them from here
    _NO_CODE,
    ANATOMIC_CONTEXT,
    ANATOMICAL_STRUCTURE,
    KIDNEY_CODE,
    LEFT_CODE,
    MORPHOLOGICALLY_ALTERED_STRUCTURE,
    NEOPLASM_CODE,
    RIGHT_CODE,
    SEGMENTS,
    SPLIT_SEGMENTS,
    TERMINOLOGY_CONTEXT,
    Code,
    SegmentSpec,
    segment_specs,
)

MODULE_NAME = "KidneyTumorSeg"
VOLUMES_TABLE_ROLE = "KidneyTumorSeg.VolumesTable"
MEASUREMENTS_TABLE_ROLE = "KidneyTumorSeg.MeasurementsTable"

# ------------------------------------------------------------------------------------------- geometry

# RAS = diag(-1, -1, 1) . LPS: the same matrix both ways.
_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Geometry tolerances for "the same grid": far below any voxel, far above float noise.
_ORIGIN_TOL_MM = 1e-3
_MATRIX_TOL = 1e-5


def ijk_to_ras_from_lps(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of an image whose geometry SimpleITK reports (LPS: origin, spacing,
    row-major 3x3 direction)."""
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.asarray(direction, float).reshape(3, 3) @ np.diag(np.asarray(spacing, float))
    ijk_to_lps[:3, 3] = np.asarray(origin, float)
    return _LPS_RAS @ ijk_to_lps


def lps_geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """(origin, spacing, direction) in SimpleITK's LPS convention from a 4x4 IJK-to-RAS matrix."""
    ijk_to_lps = _LPS_RAS @ np.asarray(ijk_to_ras, float)
    axes = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    direction = axes / spacing
    return tuple(ijk_to_lps[:3, 3]), tuple(spacing), tuple(direction.ravel())


def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras_of(volume_node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return _matrix_to_numpy(matrix)


def volume_node_to_image(volume_node: slicer.vtkMRMLScalarVolumeNode) -> sitk.Image:
    """A SimpleITK image with the node's voxels and geometry (the node's own grid; a parent transform is
    not applied: the segmentation is put under the same transform instead)."""
    image_data = volume_node.GetImageData() if volume_node is not None else None
    if image_data is None or min(image_data.GetDimensions()) < 1:
        name = volume_node.GetName() if volume_node is not None else "None"
        raise KidneyTumorSegError(f"volume {name!r} holds no voxels; load a CT volume first.")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise KidneyTumorSegError(
            f"volume {volume_node.GetName()!r} has {image_data.GetNumberOfScalarComponents()} values per voxel "
            "(a colour or vector volume); select the CT itself."
        )
    array = slicer.util.arrayFromVolume(volume_node)  # (k, j, i): SimpleITK's (z, y, x) order
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    origin, spacing, direction = lps_geometry_from_ijk_to_ras(ijk_to_ras_of(volume_node))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def write_volume_node(volume_node: slicer.vtkMRMLScalarVolumeNode, path: str | Path) -> None:
    """Write the node as an uncompressed NRRD for the command (compression would only cost time)."""
    try:
        sitk.WriteImage(volume_node_to_image(volume_node), str(path), False)
    except RuntimeError as exc:
        raise KidneyTumorSegError(
            f"{path}: the CT could not be written for the segmentation command ({str(exc).strip()[-200:]}); "
            "check free disk space in the temporary folder."
        ) from None


def read_labels_on_volume_grid(path: str | Path, volume_node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """The (k, j, i) label array of a label file, checked to lie on exactly the volume's grid."""
    try:
        labels = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise KidneyTumorSegError(f"{path}: the labels cannot be read ({str(exc).strip()[-200:]}).") from None
    size = tuple(reversed(volume_node.GetImageData().GetDimensions()))
    array = sitk.GetArrayFromImage(labels)
    expected = ijk_to_ras_of(volume_node)
    found = ijk_to_ras_from_lps(labels.GetOrigin(), labels.GetSpacing(), labels.GetDirection())
    same_grid = (
        array.shape == size
        and np.allclose(found[:3, :3], expected[:3, :3], atol=_MATRIX_TOL)
        and np.allclose(found[:3, 3], expected[:3, 3], atol=_ORIGIN_TOL_MM)
    )
    if not same_grid:
        raise KidneyTumorSegError(
            f"{path}: the labels are not on the grid of volume {volume_node.GetName()!r} (size {array.shape[::-1]} "
            f"vs {size[::-1]}, or a different origin, spacing or direction); this is a bug, please report it."
        )
    return array.astype(np.uint8, copy=False)


# ------------------------------------------------------------------------------------------- segments


def terminology_entry(category: Code, type_: Code, region: Code = _NO_CODE, modifier: Code = _NO_CODE) -> str:
    """A segment's terminology string, serialized by Slicer's Terminologies module when it offers that
    (``segments.terminology_entry`` writes the same format out)."""
    logic = getattr(slicer, "vtkSlicerTerminologiesModuleLogic", None)
    if logic is not None and hasattr(logic, "SerializeTerminologyEntry"):
        codes = [category, type_, modifier, region, _NO_CODE]
        values = [(value, scheme, meaning) for scheme, value, meaning in codes]
        return logic.SerializeTerminologyEntry(
            TERMINOLOGY_CONTEXT, *values[0], *values[1], *values[2], ANATOMIC_CONTEXT, *values[3], *values[4]
        )
    return segments.terminology_entry(category, type_, region, modifier)


def _specs_of(segmentation_node: slicer.vtkMRMLSegmentationNode) -> tuple[SegmentSpec, ...]:
    """The segment set a segmentation holds: split when it has a "Kidney, right" or "Kidney, left"."""
    segmentation = segmentation_node.GetSegmentation()
    split = any(segmentation.GetSegmentIdBySegmentName(spec.name) for spec in SPLIT_SEGMENTS if spec.label != TUMOR)
    return segment_specs(split)


def segment_ids_by_label(segmentation_node: slicer.vtkMRMLSegmentationNode) -> dict[int, str]:
    """Label value -> segment ID, for the segments this module made (found by name)."""
    segmentation = segmentation_node.GetSegmentation()
    found = {}
    for spec in _specs_of(segmentation_node):
        segment_id = segmentation.GetSegmentIdBySegmentName(spec.name)
        if segment_id:
            found[spec.label] = segment_id
    return found


# -------------------------------------------------------------------------------------------- results


@dataclass
class SegmentationResult:
    segmentation_node: slicer.vtkMRMLSegmentationNode
    table_node: slicer.vtkMRMLTableNode
    volumes_ml: dict[str, float]
    status: RunStatus | None = None
    warnings: list[str] = field(default_factory=list)
    measurements: dict | None = None  # the command's report (measurements.CaseMeasurements as JSON)
    measurements_table: slicer.vtkMRMLTableNode | None = None


# The panel's choices are exactly what the background command needs: one class, two names.
RunOptions = PredictionRequest


class SegmentationTask:
    """One run started by ``KidneyTumorSegLogic.startSegmentation``.

    Call ``poll()`` from the main thread (a timer in the GUI): it returns the run's status, and when the
    command has succeeded it imports the labels into the scene (MRML is not thread-safe, so that never
    happens on the reader threads). After a failure ``error`` holds the command's own message.
    """

    def __init__(
        self,
        logic: KidneyTumorSegLogic,
        volume_node: slicer.vtkMRMLScalarVolumeNode,
        output_node: slicer.vtkMRMLSegmentationNode | None,
        run: BackgroundPrediction,
        split_kidneys: bool = False,
        report: bool = False,
    ) -> None:
        self._logic = logic
        self.volume_node = volume_node
        self.output_node = output_node
        self.run = run
        self.split_kidneys = split_kidneys
        self.report = report
        self.result: SegmentationResult | None = None
        self.error = ""
        self._status = run.status()

    @property
    def state(self) -> RunState:
        return self._status.state

    def poll(self) -> RunStatus:
        status = self.run.status()
        if status.state == RunState.SUCCEEDED and self.result is None and not self.error:
            try:
                segmentation = self._logic.importLabels(
                    self.run.output_path, self.volume_node, self.output_node, self.split_kidneys
                )
                volumes = self._logic.segmentVolumes(segmentation)
                table = self._logic.updateVolumesTable(segmentation, volumes)
                self.result = SegmentationResult(segmentation, table, volumes, status, list(status.warnings))
                if self.report:
                    self.result.measurements = read_report(self.run.output_path)["measurements"]
                    self.result.measurements_table = self._logic.updateMeasurementsTable(
                        segmentation, self.result.measurements
                    )
            except KidneyTumorSegError as exc:
                self.error = str(exc)
                status.state = RunState.FAILED
                status.error = self.error
            finally:
                self.run.cleanup()
        elif status.state == RunState.FAILED:
            self.error = status.error
        if self.error:
            status.state = RunState.FAILED
            status.error = self.error
        self._status = status
        return status

    def cancel(self) -> None:
        self.run.cancel()
        self.poll()

    def wait(
        self,
        timeout: float | None = None,
        interval: float = 0.1,
        on_status: Callable[[RunStatus], None] | None = None,
    ) -> RunStatus:
        """Poll until the run has ended (for scripts and tests; the GUI polls with a timer instead). Past
        ``timeout`` the run is cancelled and ``SegmentationRunError`` raised."""
        deadline = None if timeout is None else time.monotonic() + timeout
        status = self.poll()
        while not status.state.finished:
            if on_status is not None:
                on_status(status)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise SegmentationRunError(f"the segmentation did not finish within {timeout:.0f} s; it was cancelled.")
            time.sleep(interval)
            status = self.poll()
        return status

    def drainLog(self) -> list[str]:
        return self.run.drain_log()


# ---------------------------------------------------------------------------------------------- logic


class KidneyTumorSegLogic:
    """Segments a CT volume node into Kidney and Tumor segments (no Qt: runs in Slicer and under pytest).

    ``scene`` defaults to ``slicer.mrmlScene`` in the application. The label import and the table need
    nothing else from Slicer: the segmentation, terminology and subject-hierarchy calls used here are
    static or live on nodes. ``launcher`` and ``python`` choose how the segmentation command is started
    (tests inject their own).
    """

    def __init__(
        self,
        scene: slicer.vtkMRMLScene | None = None,
        launcher: Launcher | None = None,
        python: str | None = None,
    ) -> None:
        self.scene = scene if scene is not None else slicer.mrmlScene
        self.launcher = launcher
        self.python = python

    # ----------------------------------------------------------------------------------- parameter node

    def getParameterNode(self) -> slicer.vtkMRMLScriptedModuleNode:
        """The module's singleton parameter node (the same one ``ScriptedLoadableModuleLogic`` would give)."""
        node = self.scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetName(self.scene.GenerateUniqueName(MODULE_NAME))
            node.SetSingletonTag(MODULE_NAME)
            node.SetAttribute("ModuleName", MODULE_NAME)
            node = self.scene.AddNode(node)
        elif node.GetAttribute("ModuleName") != MODULE_NAME:
            node.SetAttribute("ModuleName", MODULE_NAME)
        return node

    # ------------------------------------------------------------------------------------------- runs

    def startSegmentation(
        self,
        volume_node: slicer.vtkMRMLScalarVolumeNode,
        options: RunOptions | None = None,
        output_node: slicer.vtkMRMLSegmentationNode | None = None,
    ) -> SegmentationTask:
        """Write the CT to a private temporary folder and start the segmentation command on it.

        ``output_node``: an existing segmentation to overwrite, or None for a new one. Nothing in the
        scene changes until the command has succeeded (see ``SegmentationTask.poll``).
        """
        if volume_node is None:
            raise KidneyTumorSegError("no input volume: select the CT to segment.")
        options = options or RunOptions()
        run = BackgroundPrediction(self.launcher, self.python)
        try:
            write_volume_node(volume_node, run.input_path)
            run.start(options)
        except BaseException:
            run.cleanup()
            raise
        return SegmentationTask(self, volume_node, output_node, run, options.split_kidneys, options.report)

    def segment(
        self,
        volume_node: slicer.vtkMRMLScalarVolumeNode,
        options: RunOptions | None = None,
        output_node: slicer.vtkMRMLSegmentationNode | None = None,
        timeout: float | None = None,
        on_status: Callable[[RunStatus], None] | None = None,
    ) -> SegmentationResult:
        """Run to the end and return the result; raise ``SegmentationRunError`` with the command's message."""
        task = self.startSegmentation(volume_node, options, output_node)
        status = task.wait(timeout, on_status=on_status)
        if status.state == RunState.CANCELLED:
            raise SegmentationCancelledError("the segmentation was cancelled.")
        if status.state != RunState.SUCCEEDED or task.result is None:
            raise SegmentationRunError(status.error or "the segmentation failed; see the log.")
        return task.result

    # ---------------------------------------------------------------------------------------- results

    def importLabels(
        self,
        labels_path: str | Path,
        volume_node: slicer.vtkMRMLScalarVolumeNode,
        output_node: slicer.vtkMRMLSegmentationNode | None = None,
        split_kidneys: bool = False,
    ) -> slicer.vtkMRMLSegmentationNode:
        """Labels file (0 background, 1 kidney, 2 tumor on the CT's grid) -> Kidney and Tumor segments;
        with ``split_kidneys`` (1 right kidney, 2 tumor, 3 left kidney) -> "Kidney, right", "Tumor",
        "Kidney, left".

        The segments sit on exactly the CT's voxels: the labelmap takes the volume node's own IJK-to-RAS
        matrix, after a check that the file's grid is that grid. Both segments always exist (empty when
        the model found nothing), so they can be drawn in the Segment Editor. An existing ``output_node``
        has all its segments replaced; otherwise a new node is added, in the CT's study in the subject
        hierarchy when the CT has one, under the CT's parent transform.
        """
        labels = read_labels_on_volume_grid(labels_path, volume_node)  # fails before the scene changes
        labelmap = slicer.vtkMRMLLabelMapVolumeNode()
        labelmap.SetIJKToRASMatrix(_numpy_to_matrix(ijk_to_ras_of(volume_node)))
        labelmap.SetAndObserveImageData(_image_data_from_array(labels))

        created = output_node is None
        node = output_node
        if created:
            node = slicer.vtkMRMLSegmentationNode()
            node.SetName(self.scene.GenerateUniqueName(f"{volume_node.GetName()} segmentation"))
            node = self.scene.AddNode(node)
        try:
            node.CreateDefaultDisplayNodes()
            node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
            node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
            segmentation = node.GetSegmentation()
            was_modified = node.StartModify()
            try:
                segmentation.RemoveAllSegments()
                ids = vtk.vtkStringArray()
                for spec in segment_specs(split_kidneys):
                    segment_id = segmentation.AddEmptySegment("", spec.name, list(spec.color))
                    segmentation.GetSegment(segment_id).SetTerminology(spec.terminology)
                    ids.InsertNextValue(segment_id)
                # Label value v goes into ids[v - 1]: SEGMENTS are ordered by label value.
                if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node, ids):
                    raise KidneyTumorSegError(f"{labels_path}: the labels could not be imported as segments.")
            finally:
                node.EndModify(was_modified)
            node.CreateClosedSurfaceRepresentation()
            display = node.GetDisplayNode()
            if display is not None and hasattr(display, "SetPreferredDisplayRepresentationName3D"):
                display.SetPreferredDisplayRepresentationName3D("Closed surface")
        except BaseException:
            if created:
                self._remove_with_display_nodes(node)
            raise
        if created:
            self._place_beside(node, volume_node)
        return node

    def segmentVolumes(self, segmentation_node: slicer.vtkMRMLSegmentationNode) -> dict[str, float]:
        """Segment name -> volume in mL: the segment's voxel count times the voxel volume (the same measure
        as ``metrics.label_volumes_ml``, counted on the segments as they are now)."""
        from vtk.util import numpy_support

        volumes = {}
        segmentation = segmentation_node.GetSegmentation()
        for spec in _specs_of(segmentation_node):
            segment_id = segmentation.GetSegmentIdBySegmentName(spec.name)
            if not segment_id:
                continue
            labelmap = slicer.vtkOrientedImageData()
            segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
            scalars = labelmap.GetPointData().GetScalars()
            voxels = 0 if scalars is None else int(np.count_nonzero(numpy_support.vtk_to_numpy(scalars)))
            volumes[spec.name] = voxels * float(np.prod(labelmap.GetSpacing())) / 1000.0
        return volumes

    def exportLabels(
        self, segmentation_node: slicer.vtkMRMLSegmentationNode, reference_volume: slicer.vtkMRMLVolumeNode
    ) -> np.ndarray:
        """The Kidney and Tumor segments as a (k, j, i) label array on the reference volume's grid (1 kidney,
        2 tumor; or 1 right kidney, 2 tumor, 3 left kidney for split segments: the inverse of
        ``importLabels``)."""
        ids_by_label = segment_ids_by_label(segmentation_node)
        ids = vtk.vtkStringArray()
        for spec in _specs_of(segmentation_node):
            if spec.label not in ids_by_label:
                raise KidneyTumorSegError(f"segmentation {segmentation_node.GetName()!r} has no {spec.name} segment.")
            ids.InsertNextValue(ids_by_label[spec.label])
        labelmap = slicer.vtkMRMLLabelMapVolumeNode()
        color_tables_before = self._node_ids("vtkMRMLColorTableNode")
        self.scene.AddNode(labelmap)  # the export needs a scene for the labelmap's display nodes
        try:
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, reference_volume
            ):
                raise KidneyTumorSegError(f"segmentation {segmentation_node.GetName()!r} could not be exported.")
            return np.array(slicer.util.arrayFromVolume(labelmap), dtype=np.uint8)
        finally:
            self._remove_with_display_nodes(labelmap)
            for node_id in self._node_ids("vtkMRMLColorTableNode") - color_tables_before:  # made by the export
                self.scene.RemoveNode(self.scene.GetNodeByID(node_id))

    def updateVolumesTable(
        self, segmentation_node: slicer.vtkMRMLSegmentationNode, volumes: dict[str, float] | None = None
    ) -> slicer.vtkMRMLTableNode:
        """A table of the segments' volumes in mL (``segmentVolumes`` unless given); the segmentation's
        own table is reused on a rerun."""
        volumes = self.segmentVolumes(segmentation_node) if volumes is None else volumes
        table = self._table_of(segmentation_node, VOLUMES_TABLE_ROLE, "volumes")
        was_modified = table.StartModify()
        table.RemoveAllColumns()
        names = vtk.vtkStringArray()
        names.SetName("Segment")
        values = vtk.vtkDoubleArray()
        values.SetName("Volume [mL]")
        for name, volume in volumes.items():
            names.InsertNextValue(name)
            values.InsertNextValue(round(volume, 3))
        table.AddColumn(names)
        table.AddColumn(values)
        table.SetColumnUnitLabel("Volume [mL]", "mL")
        table.SetColumnDescription("Volume [mL]", "Segment volume: voxel count times voxel volume")
        table.EndModify(was_modified)
        return table

    def updateMeasurementsTable(
        self, segmentation_node: slicer.vtkMRMLSegmentationNode, measurements: dict
    ) -> slicer.vtkMRMLTableNode:
        """One row per tumor (largest first) with the report's measurements: side, volume, diameters,
        tumor-to-kidney ratio and the R.E.N.A.L. parts (N not computed); reused on a rerun."""
        table = self._table_of(segmentation_node, MEASUREMENTS_TABLE_ROLE, "measurements")
        was_modified = table.StartModify()
        table.RemoveAllColumns()
        columns = [
            (name, vtk.vtkStringArray() if kind is str else vtk.vtkDoubleArray()) for name, kind in MEASUREMENT_COLUMNS
        ]
        for name, array in columns:
            array.SetName(name)
        for tumor in measurements.get("tumors", []):
            renal = tumor["renal"]
            values = [
                f"Tumor {tumor['tumor']}",
                tumor["side"],
                tumor["volume_ml"],
                tumor["largest_diameter_mm"],
                tumor["axial_long_axis_mm"],
                tumor["axial_short_axis_mm"],
                tumor["tumor_to_kidney_volume_ratio"],
                str(renal["R"]["score"]),
                f"{renal['E']['score']} ({100 * renal['E']['value']:.0f}% outside)",
                str(renal["A"]["score"]),
                str(renal["L"]["score"]),
                "not computed",
            ]
            for (_, array), value in zip(columns, values, strict=True):
                if isinstance(array, vtk.vtkStringArray):
                    array.InsertNextValue(str(value))
                else:
                    array.InsertNextValue(float("nan") if value is None else round(float(value), 3))
        for _, array in columns:
            table.AddColumn(array)
        for name, unit in (("Volume [mL]", "mL"), ("Largest diameter [mm]", "mm"), ("Axial long axis [mm]", "mm")):
            table.SetColumnUnitLabel(name, unit)
        table.SetColumnDescription("N", "nearness to the collecting system: the model does not segment it")
        table.EndModify(was_modified)
        return table

    # -------------------------------------------------------------------------------------- internals

    def _table_of(
        self, segmentation_node: slicer.vtkMRMLSegmentationNode, role: str, suffix: str
    ) -> slicer.vtkMRMLTableNode:
        """The segmentation's table for ``role``, made (named "SEGMENTATION suffix", beside it in the subject
        hierarchy) on first use and reused on a rerun."""
        table = segmentation_node.GetNodeReference(role)
        if table is None:
            table = slicer.vtkMRMLTableNode()
            table.SetName(self.scene.GenerateUniqueName(f"{segmentation_node.GetName()} {suffix}"))
            table = self.scene.AddNode(table)
            segmentation_node.SetNodeReferenceID(role, table.GetID())
            self._place_beside(table, segmentation_node)
        return table

    def _node_ids(self, class_name: str) -> set[str]:
        return {
            self.scene.GetNthNodeByClass(i, class_name).GetID()
            for i in range(self.scene.GetNumberOfNodesByClass(class_name))
        }

    def _remove_with_display_nodes(self, node: slicer.vtkMRMLNode) -> None:
        if node is None or node.GetScene() is None:
            return
        if hasattr(node, "GetNumberOfDisplayNodes"):
            for index in reversed(range(node.GetNumberOfDisplayNodes())):
                display = node.GetNthDisplayNode(index)
                if display is not None:
                    self.scene.RemoveNode(display)
        storage = node.GetStorageNode() if hasattr(node, "GetStorageNode") else None
        if storage is not None:
            self.scene.RemoveNode(storage)
        self.scene.RemoveNode(node)

    def _place_beside(self, node: slicer.vtkMRMLNode, sibling: slicer.vtkMRMLNode) -> None:
        """Put ``node`` under the same subject-hierarchy parent as ``sibling`` (the CT's study), when the
        sibling is in the hierarchy."""
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        if hierarchy is None:
            return
        invalid = hierarchy.GetInvalidItemID()
        sibling_item = hierarchy.GetItemByDataNode(sibling)
        if sibling_item == invalid:
            return
        parent = hierarchy.GetItemParent(sibling_item)
        item = hierarchy.GetItemByDataNode(node)
        if item == invalid:  # the application creates items for new nodes by itself; a bare scene does not
            hierarchy.CreateItem(parent, node)
        else:
            hierarchy.SetItemParent(item, parent)


MEASUREMENT_COLUMNS = (
    ("Tumor", str),
    ("Side", str),
    ("Volume [mL]", float),
    ("Largest diameter [mm]", float),
    ("Axial long axis [mm]", float),
    ("Axial short axis [mm]", float),
    ("Tumor/kidney volume", float),
    ("R", str),
    ("E", str),
    ("A", str),
    ("L", str),
    ("N", str),
)


def read_report(labels_path: str | Path) -> dict:
    """The command's ``NAME.report.json`` beside the labels it wrote."""
    from .report import report_paths

    path = report_paths(labels_path)[0]
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KidneyTumorSegError(f"{path}: the measurements could not be read ({exc}).") from None


def _image_data_from_array(array: np.ndarray) -> vtk.vtkImageData:
    """A vtkImageData holding a copy of a (k, j, i) uint8 array, with origin 0 and spacing 1 (the geometry
    is the node's IJK-to-RAS matrix)."""
    from vtk.util import numpy_support

    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array, dtype=np.uint8).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    return image
