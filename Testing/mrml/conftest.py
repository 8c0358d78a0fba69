"""Fixtures of the headless Slicer suite: the real Slicer core (``slicer-core``), no application, no Qt.

The suites that need ``slicer`` are skipped, with the reason, when slicer-core is not installed; the
checks of the panel's ``.ui`` file and of the packaging run everywhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest

NEEDS_SLICER = ["test_boundary.py", "test_logic.py"]


def _slicer_core_problem() -> str | None:
    try:
        import slicer
    except ImportError as exc:
        return (
            f"slicer-core is not installed ({exc}); install the test extras: "
            "pip install -c constraints.txt -e '.[test]'"
        )
    if not hasattr(slicer, "vtkMRMLScene"):
        return (
            f"the 'slicer' package at {getattr(slicer, '__file__', '?')} is not slicer-core (the unrelated PyPI "
            "package 'slicer', pulled in by shap, shadows it); uninstall it and reinstall slicer-core"
        )
    return None


SLICER_CORE_PROBLEM = _slicer_core_problem()
if SLICER_CORE_PROBLEM:
    collect_ignore = NEEDS_SLICER


@pytest.fixture(scope="session")
def slicer_core_problem() -> str | None:
    """Why the suites that need slicer-core are not collected (None: they are)."""
    if SLICER_CORE_PROBLEM:
        return f"{', '.join(NEEDS_SLICER)} not run: {SLICER_CORE_PROBLEM}"
    return None


@pytest.fixture(scope="session")
def headless():
    """One headless Slicer per session (the Segmentations logic registers its converters once)."""
    if SLICER_CORE_PROBLEM:
        pytest.skip(SLICER_CORE_PROBLEM)
    from KidneyTumorSegLib.selftests import headless_slicer

    return headless_slicer()


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_child():
    """The commands these tests start share two cores with whatever else runs: one thread each."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture
def scene(headless):
    """The session's scene, emptied after each test (the logics stay)."""
    yield headless.scene
    headless.scene.Clear(0)


@pytest.fixture(scope="session")
def context_factory(headless, tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    from KidneyTumorSegLib.selftests import SelfTestContext

    def make(name: str) -> SelfTestContext:
        return SelfTestContext(
            scene=headless.scene,
            volumes_logic=headless.volumes,
            segmentations_logic=headless.segmentations,
            model_path=tiny_model_path,
            workdir=tmp_path_factory.mktemp(name),
            device="cpu",
            timeout_s=300,
        )

    return make
