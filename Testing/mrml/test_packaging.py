"""The Slicer extension's packaging: what CMake installs, the catalog entry, the icons.

An extension ships only the files its CMakeLists lists, so a module file or model that is not listed
works in the source tree and is missing from every installed copy. These tests read the CMake files as
text (no CMake or Slicer build is needed).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "KidneyTumorSeg"
TOP_CMAKE = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
MODULE_CMAKE = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")


def _cmake_set(text: str, name: str) -> list[str]:
    match = re.search(rf'set\(\s*{name}\s+((?:"[^"]*"|[^")])*)\)', text, re.S)
    assert match, f"set({name} ...) not found"
    items = re.findall(r'"[^"]*"|\S+', match.group(1))
    return [item.strip('"') for item in items]


def _packaged_files() -> set[str]:
    listed = _cmake_set(MODULE_CMAKE, "MODULE_PYTHON_SCRIPTS") + _cmake_set(MODULE_CMAKE, "MODULE_PYTHON_RESOURCES")
    return {item.replace("${MODULE_NAME}", "KidneyTumorSeg") for item in listed}


def _files_under(folder: Path) -> set[str]:
    return {
        str(path.relative_to(MODULE_DIR)).replace("\\", "/")
        for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and not path.name.startswith(".")
    }


def test_every_library_file_and_model_is_listed_for_packaging():
    present = _files_under(MODULE_DIR / "KidneyTumorSegLib") | _files_under(MODULE_DIR / "Resources" / "Models")
    missing = sorted(present - _packaged_files())
    assert not missing, f"not listed in KidneyTumorSeg/CMakeLists.txt, so not packaged: {missing}"


def test_every_listed_file_exists():
    absent = sorted(f for f in _packaged_files() if not (MODULE_DIR / f).is_file())
    assert not absent, f"listed in KidneyTumorSeg/CMakeLists.txt but absent: {absent}"


def test_module_is_built_as_a_scripted_module_with_tests():
    assert re.search(r"slicerMacroBuildScriptedModule\(.*WITH_GENERIC_TESTS.*\)", MODULE_CMAKE, re.S)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in MODULE_CMAKE
    assert (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").is_file()
    for listed in re.findall(
        r"SCRIPT\s+\$\{CMAKE_CURRENT_SOURCE_DIR\}/(\S+)",
        (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").read_text(),
    ):
        assert (MODULE_DIR / "Testing" / "Python" / listed).is_file(), listed


def test_extension_metadata_is_complete_and_depends_on_pytorch():
    for field in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert _cmake_set(TOP_CMAKE, f"EXTENSION_{field}"), field
    assert _cmake_set(TOP_CMAKE, "EXTENSION_CATEGORY") == ["Segmentation"]
    assert _cmake_set(TOP_CMAKE, "EXTENSION_DEPENDS") == ["PyTorch"]
    assert "Research use only" in " ".join(_cmake_set(TOP_CMAKE, "EXTENSION_DESCRIPTION"))
    assert "add_subdirectory(KidneyTumorSeg)" in TOP_CMAKE


def test_icon_and_screenshot_urls_point_at_files_in_the_repository():
    for field in ("ICONURL", "SCREENSHOTURLS"):
        for url in _cmake_set(TOP_CMAKE, f"EXTENSION_{field}"):
            path = url.split("/main/", 1)[1]
            assert (ROOT / path).is_file(), f"EXTENSION_{field} names {path}, which is not in the repository"


def test_catalog_entry_follows_the_extensions_index_schema():
    entry = json.loads((ROOT / "KidneyTumorSeg.json").read_text(encoding="utf-8"))
    # Slicer's slicer-extension-catalog-entry-schema-v1.0.1: required fields, no others, types.
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}  # fmt: skip
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert set(entry) <= allowed, f"fields the schema forbids: {sorted(set(entry) - allowed)}"
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["category"] == _cmake_set(TOP_CMAKE, "EXTENSION_CATEGORY")[0]
    assert entry["build_dependencies"] == _cmake_set(TOP_CMAKE, "EXTENSION_DEPENDS")
    assert entry.get("scm_type", "git") in ("git", "local") and entry.get("tier", 5) in (1, 3, 5)
    homepage = _cmake_set(TOP_CMAKE, "EXTENSION_HOMEPAGE")[0]
    assert homepage.startswith(entry["scm_url"]), "homepage and scm_url name different repositories"


def test_icons_are_128_pixel_pngs_drawn_by_the_script():
    for icon in (
        MODULE_DIR / "Resources" / "Icons" / "KidneyTumorSeg.png",
        ROOT / "Resources" / "Icons" / "KidneyTumorSeg.png",
    ):
        image = sitk.ReadImage(str(icon))
        assert image.GetSize() == (128, 128), icon
        assert image.GetNumberOfComponentsPerPixel() in (3, 4), icon
    done = subprocess.run(
        [sys.executable, str(ROOT / "Resources" / "make_icons.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
