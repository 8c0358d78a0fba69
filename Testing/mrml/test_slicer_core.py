"""Whether the real Slicer core is here. Without it the suites that need it (test_boundary, test_logic)
are not collected, and this test reports why as a skip."""

from __future__ import annotations

import pytest


def test_slicer_core_provides_the_classes_the_module_uses(slicer_core_problem):
    if slicer_core_problem:
        pytest.skip(slicer_core_problem)
    import slicer

    for name in (
        "vtkMRMLScene",
        "vtkMRMLSegmentationNode",
        "vtkMRMLSegmentationStorageNode",
        "vtkMRMLSubjectHierarchyNode",
        "vtkSlicerVolumesLogic",
        "vtkSlicerSegmentationsModuleLogic",
        "vtkSlicerTerminologiesModuleLogic",
    ):
        assert hasattr(slicer, name), f"slicer-core lacks {name}"
