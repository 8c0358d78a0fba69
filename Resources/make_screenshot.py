"""Render the README picture: a phantom CT segmented through the Slicer module's logic, drawn offscreen.

    python Resources/make_screenshot.py [--model MODEL] [--seed 7] [-o Resources/Screenshots/phantom-result.png]

What it does, all without the Slicer application (``slicer-core``, headless): a synthetic abdominal CT
(``phantom.make_phantom``) is loaded as a volume node by Slicer's reader, segmented by the module's logic
(the background ``predict`` command, the labels back as Kidney and Tumor segments with closed surfaces),
then drawn: on the left the core's quality-control slices (axial above coronal, segments exported on the
CT's grid) and on the right the segments' closed surfaces rendered by VTK offscreen, seen from the front
with the spine for orientation. It is a rendering of the core's output, not a screenshot of the app.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "Resources" / "Screenshots" / "phantom-result.png"


def _surface_actor(polydata: vtk.vtkPolyData, color, opacity: float = 1.0) -> vtk.vtkActor:
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputData(polydata)
    normals.SetFeatureAngle(60)
    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputConnection(normals.GetOutputPort())
    mapper.ScalarVisibilityOff()
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    actor.GetProperty().SetColor(*color)
    actor.GetProperty().SetOpacity(opacity)
    actor.GetProperty().SetSpecular(0.2)
    return actor


def _iso_surface(array: np.ndarray, ijk_to_ras: np.ndarray, level: float) -> vtk.vtkPolyData:
    """An iso-surface of a (k, j, i) array, in RAS."""
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array, np.float32).ravel()))
    contour = vtk.vtkFlyingEdges3D()
    contour.SetInputData(image)
    contour.SetValue(0, level)
    smooth = vtk.vtkWindowedSincPolyDataFilter()
    smooth.SetInputConnection(contour.GetOutputPort())
    smooth.SetNumberOfIterations(15)
    smooth.SetPassBand(0.1)
    smooth.NonManifoldSmoothingOn()
    smooth.NormalizeCoordinatesOn()
    transform = vtk.vtkTransform()
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(ijk_to_ras[r, c]))
    transform.SetMatrix(matrix)
    to_ras = vtk.vtkTransformPolyDataFilter()
    to_ras.SetInputConnection(smooth.GetOutputPort())
    to_ras.SetTransform(transform)
    to_ras.Update()
    return to_ras.GetOutput()


def render_3d(segmentation_node, ct: np.ndarray, ijk_to_ras: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Closed surfaces of the segments (and the spine, for orientation) seen from the front, as RGB."""
    from KidneyTumorSegLib.mrml import SEGMENTS

    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0.07, 0.08, 0.10)
    segmentation = segmentation_node.GetSegmentation()
    corners = []
    for spec in SEGMENTS:
        surface = vtk.vtkPolyData()
        segment_id = segmentation.GetSegmentIdBySegmentName(spec.name)
        segmentation_node.GetClosedSurfaceRepresentation(segment_id, surface)
        if surface.GetNumberOfPoints():
            renderer.AddActor(_surface_actor(surface, spec.color))
            corners.append(np.reshape(surface.GetBounds(), (3, 2)).T)
    bone = _iso_surface((ct > 350).astype(np.float32), ijk_to_ras, 0.5)
    renderer.AddActor(_surface_actor(bone, (0.92, 0.90, 0.84), 0.35))
    skin = _iso_surface((ct > -400).astype(np.float32), ijk_to_ras, 0.5)
    renderer.AddActor(_surface_actor(skin, (0.85, 0.75, 0.70), 0.06))

    caption = vtk.vtkTextActor()
    caption.SetInput("closed surfaces: Kidney, Tumor (spine and skin for orientation), seen from the front")
    caption.GetTextProperty().SetFontSize(15)
    caption.GetTextProperty().SetColor(0.9, 0.9, 0.9)
    caption.SetPosition(10, 10)
    renderer.AddViewProp(caption)

    # From the front (anterior, +A), superior up: the patient's right on the viewer's left.
    center = np.mean(np.concatenate(corners), axis=0) if corners else np.zeros(3)
    camera = renderer.GetActiveCamera()
    camera.SetFocalPoint(*center)
    camera.SetPosition(center[0], center[1] + 600.0, center[2])
    camera.SetViewUp(0, 0, 1)
    renderer.ResetCamera()
    camera.Zoom(1.6)

    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*size)
    window.SetMultiSamples(8)
    window.AddRenderer(renderer)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    width, height, _ = image.GetDimensions()
    rgb = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, 3)
    return np.ascontiguousarray(rgb[::-1])  # VTK's rows start at the bottom


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="registry name or model file (default: the registry's default)")
    parser.add_argument("--seed", type=int, default=7, help="phantom seed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)

    from KidneyTumorSegLib.mrml import KidneyTumorSegLogic, RunOptions, ijk_to_ras_of, volume_node_to_image
    from KidneyTumorSegLib.overlay import overlay_panels, write_png
    from KidneyTumorSegLib.phantom import make_phantom
    from KidneyTumorSegLib.selftests import headless_slicer

    slicer_core = headless_slicer()
    with tempfile.TemporaryDirectory() as folder:
        ct_path = Path(folder) / "phantom-ct.nrrd"
        sitk.WriteImage(make_phantom(args.seed, n_tumors=1).image, str(ct_path))
        volume = slicer_core.volumes.AddArchetypeVolume(str(ct_path), "Phantom CT", 0, None)
    logic = KidneyTumorSegLogic(slicer_core.scene)
    result = logic.segment(volume, RunOptions(model=args.model, device=args.device), timeout=3600)
    print("volumes (mL): " + ", ".join(f"{k} {v:.1f}" for k, v in result.volumes_ml.items()))
    for warning in result.warnings:
        print(f"warning: {warning}")

    ct_image = volume_node_to_image(volume)
    labels = sitk.GetImageFromArray(logic.exportLabels(result.segmentation_node, volume))
    labels.CopyInformation(ct_image)
    slices = overlay_panels(ct_image, [labels], pixel_mm=1.0)
    surfaces = render_3d(
        result.segmentation_node, sitk.GetArrayViewFromImage(ct_image), ijk_to_ras_of(volume), (720, slices.shape[0])
    )
    gap = np.full((slices.shape[0], 6, 3), 255, np.uint8)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_png(np.concatenate([slices, gap, surfaces], axis=1), args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
