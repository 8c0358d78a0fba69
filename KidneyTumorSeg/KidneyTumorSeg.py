"""Kidney Tumor Segmentation: the 3D Slicer module.

A thin face over ``KidneyTumorSegLib``: the panel, its parameter node and the self-test. Qt, ctk and
``slicer.app`` are used here and nowhere else; the logic (``KidneyTumorSegLib.mrml``) runs the
segmentation command in a background process and brings its labels back as segments.
"""

import enum
import importlib.metadata
import importlib.util
import logging
import shutil
import tempfile
import time
from pathlib import Path

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from KidneyTumorSegLib import environment
from KidneyTumorSegLib.mrml import KidneyTumorSegLogic, RunOptions
from KidneyTumorSegLib.process import RunState, SegmentationRunError

SAFETENSORS_REQUIREMENT = "safetensors>=0.4"
_FROM_FILE = "\x00from-file"  # item data of the model list's "From file..." entry
_POLL_INTERVAL_MS = 250

#
# KidneyTumorSeg
#


class KidneyTumorSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Kidney Tumor Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []  # the PyTorch extension is asked for when a run is, not at load
        self.parent.contributors = ["KidneyTumorSeg contributors"]
        self.parent.helpText = _(
            """
Segments the kidneys and kidney tumors in a contrast-enhanced abdominal CT with a 3D DeepLab v3+ and puts
the result in the scene as a segmentation with two segments, <b>Kidney</b> and <b>Tumor</b>, ready for
correction in the Segment Editor.
<p><b>Research use only. Not for clinical diagnosis or treatment decisions.</b> Every result must be
reviewed by a qualified reader. The bundled demo model is untrained: its labels are meaningless.</p>
<p>Select the CT, a model and a device, press Apply. The network runs in a separate process (the
application stays responsive; Cancel stops it). Volumes in mL are listed per segment.</p>
<p>How to cite: the method follows the KiTS19 submission of L. Daza, A. G&oacute;mez and P. Arbel&aacute;ez
(DeepLab v3+ carried to 3D CT); please cite DeepLab v3+ (L.-C. Chen et al., "Encoder-Decoder with Atrous
Separable Convolution for Semantic Image Segmentation", ECCV 2018), the KiTS19 challenge (N. Heller et al.,
Medical Image Analysis 67, 2021) and this extension
(<a href="https://github.com/KidneyTumorSeg/SlicerKidneyTumorSeg">KidneyTumorSeg</a>).</p>
"""
        )
        self.parent.acknowledgementText = _(
            """
Developed by the KidneyTumorSeg contributors. The module follows the conventions of 3D Slicer's scripted
module template; the KiTS19 and KiTS21/23 challenges provided the data the method is designed for.
"""
        )


#
# KidneyTumorSegParameterNode
#


class Device(enum.Enum):
    AUTO = "auto"
    GPU = "cuda"
    CPU = "cpu"

    def label(self) -> str:
        return {
            Device.AUTO: _("Auto (GPU when usable)"),
            Device.GPU: _("GPU (CUDA)"),
            Device.CPU: _("CPU"),
        }[self]


@parameterNodeWrapper
class KidneyTumorSegParameterNode:
    """
    inputVolume - the CT to segment.
    model - registry name or model file; empty for the registry's default model.
    device - where the network runs.
    tta - mirroring test-time augmentation.
    postprocess - keep plausible kidney components, drop tumor that touches no kidney.
    splitKidneys - separate left and right kidney (by the patient's anatomy) into two segments.
    outputSegmentation - segmentation to overwrite; none to create a new one.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    model: str = ""
    device: Device = Device.AUTO
    tta: bool = False
    postprocess: bool = True
    splitKidneys: bool = False
    outputSegmentation: vtkMRMLSegmentationNode


#
# KidneyTumorSegWidget
#


class KidneyTumorSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task = None
        self._lastResult = None
        self._environment = None  # the child Python's answer (environment.describe)
        self._environmentQuery = None
        self._modelQuery = None
        self._describedModel = None
        self._timer = qt.QTimer()
        self._timer.setInterval(_POLL_INTERVAL_MS)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/KidneyTumorSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = KidneyTumorSegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelComboBox.connect("activated(int)", self.onModelChosen)
        self.ui.editInSegmentEditorButton.connect("clicked(bool)", self.onEditInSegmentEditor)
        self._timer.connect("timeout()", self.onTimer)

        self.ui.progressBar.setVisible(False)
        self.ui.resultsCollapsibleButton.setVisible(False)
        self._fillModelList()
        self.initializeParameterNode()
        self._queryEnvironment()

    def cleanup(self) -> None:
        self._timer.stop()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(KidneyTumorSegParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            # The volume shown in the views, else the first one.
            layoutManager = slicer.app.layoutManager()
            shown = None
            if layoutManager is not None and layoutManager.sliceWidget("Red") is not None:
                compositeNode = layoutManager.sliceWidget("Red").mrmlSliceCompositeNode()
                shown = slicer.mrmlScene.GetNodeByID(compositeNode.GetBackgroundVolumeID() or "")
            if not isinstance(shown, vtkMRMLScalarVolumeNode) or shown.IsA("vtkMRMLLabelMapVolumeNode"):
                shown = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if shown:
                self._parameterNode.inputVolume = shown

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui file are bound to the fields.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._selectModelInList()
        self._describeModel()
        self._checkCanApply()

    def _checkCanApply(self) -> None:
        if self._task is not None:
            self.ui.applyButton.enabled = True
            return
        if self._parameterNode and self._parameterNode.inputVolume:
            self.ui.applyButton.toolTip = _("Segment the kidneys and kidney tumors in the input volume.")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.toolTip = _("Select the input CT volume.")
            self.ui.applyButton.enabled = False

    # ---------------------------------------------------------------------------------------- models

    def _fillModelList(self) -> None:
        """Registry models (once the child Python has listed them), then "From file...". Item data is
        the model spec; "" is the registry's default."""
        combo = self.ui.modelComboBox
        combo.blockSignals(True)
        combo.clear()
        models = (self._environment or {}).get("models") or []
        if not models:
            combo.addItem(_("Default model"), "")
        for model in models:
            text = f"{model['name']} {model['version']}"
            if not model.get("trained"):
                text += " " + _("(untrained)")
            combo.addItem(text, model["name"])
        combo.addItem(_("From file..."), _FROM_FILE)
        combo.blockSignals(False)
        self._selectModelInList()

    def _selectModelInList(self) -> None:
        if not self._parameterNode:
            return
        combo = self.ui.modelComboBox
        spec = self._parameterNode.model
        index = combo.findData(spec)
        if index < 0 and not spec:
            default = next((m["name"] for m in (self._environment or {}).get("models", []) if m.get("default")), "")
            index = combo.findData(default)
        if index < 0 and spec:
            combo.blockSignals(True)
            combo.insertItem(combo.count - 1, Path(spec).name, spec)
            combo.blockSignals(False)
            index = combo.findData(spec)
        if index >= 0 and combo.currentIndex != index:
            combo.blockSignals(True)
            combo.setCurrentIndex(index)
            combo.blockSignals(False)

    def onModelChosen(self, index: int) -> None:
        spec = self.ui.modelComboBox.itemData(index)
        if spec == _FROM_FILE:
            path = qt.QFileDialog.getOpenFileName(
                self.parent, _("Choose a KidneyTumorSeg model file"), "", _("Model files (*.safetensors)")
            )
            if not path:
                self._selectModelInList()  # back to the model in use
                return
            spec = path
        self._parameterNode.model = spec or ""

    def _describeModel(self) -> None:
        """One line on the selected model, from the child Python (it reads the model file's metadata)."""
        if not self._parameterNode:
            return
        spec = self._parameterNode.model or next(
            (m["name"] for m in (self._environment or {}).get("models", []) if m.get("default")), ""
        )
        if spec == self._describedModel or not spec:
            return
        self._describedModel = spec
        self.ui.modelDescriptionLabel.text = _("Reading the model's description...")
        self._modelQuery = environment.BackgroundQuery(model=spec)
        self._timer.start()

    # ----------------------------------------------------------------------------------- environment

    def _queryEnvironment(self) -> None:
        self.ui.deviceDescriptionLabel.text = _("Looking for PyTorch and GPUs...")
        self._environmentQuery = environment.BackgroundQuery()
        self._timer.start()

    def _onEnvironmentAnswered(self, info: dict) -> None:
        self._environment = info
        self.ui.deviceDescriptionLabel.text = environment.device_summary(info)
        self._fillModelList()
        self._describedModel = None
        self._describeModel()

    # ------------------------------------------------------------------------------------------ runs

    def onApplyButton(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self.onTimer()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            if not self._ensureDependencies():
                return
            parameters = self._parameterNode
            options = RunOptions(
                model=parameters.model or None,
                device=parameters.device.value,
                tta=parameters.tta,
                postprocess=parameters.postprocess,
                split_kidneys=parameters.splitKidneys,
                report=True,
            )
            self.ui.logTextEdit.clear()
            self._task = self.logic.startSegmentation(parameters.inputVolume, options, parameters.outputSegmentation)
            self._setRunning(True)
            self._timer.start()

    def onTimer(self) -> None:
        for name, onAnswer in (("_environmentQuery", self._onEnvironmentAnswered), ("_modelQuery", None)):
            query = getattr(self, name)
            if query is not None and query.done:
                setattr(self, name, None)
                if onAnswer is not None:
                    onAnswer(query.result)
                else:
                    self.ui.modelDescriptionLabel.text = environment.model_summary(query.result.get("model"))
        if self._task is not None:
            self._pollTask()
        if self._task is None and self._environmentQuery is None and self._modelQuery is None:
            self._timer.stop()

    def _pollTask(self) -> None:
        task = self._task
        status = task.poll()
        for line in task.drainLog():
            self.ui.logTextEdit.appendPlainText(line)
        self.ui.progressBar.value = int(round(100 * status.fraction))
        stage = status.stage or _("starting")
        self.ui.progressBar.format = f"{stage}: %p%"
        text = _("{stage}: {elapsed} elapsed").format(stage=stage, elapsed=_formatDuration(status.elapsed_s))
        if status.eta_s is not None and not status.state.finished:
            text += ", " + _("about {remaining} remaining").format(remaining=_formatDuration(status.eta_s))
        self.ui.statusLabel.text = text
        if not status.state.finished:
            return
        self._task = None
        self._setRunning(False)
        if status.state == RunState.SUCCEEDED:
            self._showResult(task.result)
            done = _("Done in {elapsed}.").format(elapsed=_formatDuration(status.elapsed_s))
            if status.warnings:
                done += " " + _("{count} warning(s): see the log.").format(count=len(status.warnings))
            self.ui.statusLabel.text = done
        elif status.state == RunState.CANCELLED:
            self.ui.statusLabel.text = _("Cancelled; the scene is unchanged.")
        else:
            self.ui.statusLabel.text = _("Failed: {error}").format(error=status.error)
            with slicer.util.tryWithErrorDisplay(_("Segmentation failed.")):
                raise SegmentationRunError(status.error)

    def _setRunning(self, running: bool) -> None:
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.toolTip = _("Stop the segmentation; the scene stays as it was.") if running else ""
        for widget in (
            self.ui.inputsCollapsibleButton,
            self.ui.optionsCollapsibleButton,
            self.ui.outputsCollapsibleButton,
        ):
            widget.enabled = not running
        self.ui.progressBar.setVisible(running)
        if running:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting...")
        self._checkCanApply()

    def _showResult(self, result) -> None:
        self._lastResult = result
        volume = self._parameterNode.inputVolume
        slicer.util.setSliceViewerLayers(background=volume, fit=False)
        result.segmentation_node.GetDisplayNode().SetVisibility(True)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None and layoutManager.threeDWidget(0) is not None:
            layoutManager.threeDWidget(0).threeDView().resetFocalPoint()
        self.ui.resultsTableView.setMRMLTableNode(result.table_node)
        self.ui.measurementsTableView.setMRMLTableNode(result.measurements_table)
        self.ui.measurementsTableView.setVisible(result.measurements_table is not None)
        self.ui.resultsCollapsibleButton.setVisible(True)
        self.ui.resultsCollapsibleButton.collapsed = False

    def onEditInSegmentEditor(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to open the Segment Editor."), waitCursor=True):
            if self._lastResult is None:
                raise ValueError(_("Run a segmentation first."))
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(self._lastResult.segmentation_node)
            editor.setSourceVolumeNode(self._parameterNode.inputVolume)

    # ---------------------------------------------------------------------------------- dependencies

    def _ensureDependencies(self) -> bool:
        """torch through the PyTorch extension, safetensors after the user agrees. Never at module load;
        never Slicer's own numpy or SimpleITK. False: the user declined."""
        minimum = environment.MIN_TORCH_VERSION
        installed = _installedVersion("torch")
        if installed is None:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError(
                    _(
                        "This module needs PyTorch, installed through the PyTorch extension: install "
                        "'PyTorch' from the Extensions Manager, restart Slicer and press Apply again."
                    )
                ) from None
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=True, torchVersionRequirement=f">={minimum}"
            )
            if torch is None:
                return False
            self._queryEnvironment()
        elif not _versionAtLeast(installed, minimum):
            raise RuntimeError(
                _(
                    "PyTorch {installed} is installed; this module needs {minimum} or later. Use the 'PyTorch Util' "
                    "module to install a newer version, then restart Slicer."
                ).format(installed=installed, minimum=minimum)
            )
        if importlib.util.find_spec("safetensors") is None:
            if not slicer.util.confirmOkCancelDisplay(
                _(
                    "The Python package 'safetensors' (model files) is needed and will now be downloaded and "
                    "installed ({requirement}). Continue?"
                ).format(requirement=SAFETENSORS_REQUIREMENT),
                windowTitle=_("Install a Python package"),
            ):
                return False
            slicer.util.pip_install(SAFETENSORS_REQUIREMENT)  # no dependencies: numpy & co stay untouched
        return True


def _installedVersion(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _versionAtLeast(installed: str, minimum: str) -> bool:
    from packaging.version import Version

    return Version(installed.split("+")[0]) >= Version(minimum)


def _formatDuration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


#
# KidneyTumorSegTest
#


class KidneyTumorSegTest(ScriptedLoadableModuleTest):
    """Runs, inside Slicer, the checks that ``Testing/mrml`` runs headless (``KidneyTumorSegLib.selftests``):
    a phantom CT segmented end to end on the CPU with the bundled model, against the command's own labels;
    names, colors, terminology, 3D, the study, the volumes table, .seg.nrrd, overwrite, cancel, errors."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_KidneyTumorSeg_EndToEnd()

    def test_KidneyTumorSeg_EndToEnd(self):
        from KidneyTumorSegLib import selftests

        missing = [name for name in ("torch", "safetensors") if importlib.util.find_spec(name) is None]
        if missing:
            self.delayDisplay(
                f"Skipped: {', '.join(missing)} not installed (press Apply in the module once to install them)."
            )
            return
        workdir = Path(tempfile.mkdtemp(prefix="KidneyTumorSegTest-"))
        context = selftests.SelfTestContext(
            scene=slicer.mrmlScene,
            volumes_logic=slicer.modules.volumes.logic(),
            segmentations_logic=slicer.modules.segmentations.logic(),
            model_path=None,  # the registry's default (bundled) model
            workdir=workdir,
            device="cpu",  # two runs compared voxel for voxel: GPU kernels need not be deterministic
        )
        started = time.monotonic()
        try:
            selftests.run_all(context, log=self.delayDisplay)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        logging.info(f"KidneyTumorSeg self-test took {time.monotonic() - started:.0f} s")
        self.delayDisplay("Test passed")
