"""The panel in the Slicer application: parameter-node bindings and the Apply button's state.

Registered with ctest by ``slicer_add_python_unittest`` (see CMakeLists.txt); inside Slicer it also runs
with ``slicer.util.reloadScriptedModule`` and ``unittest`` from the Python console. Runs nothing heavy:
the segmentation itself is checked by the module's self-test.
"""

import unittest

import numpy as np
import slicer


class KidneyTumorSegWidgetTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()
        slicer.util.selectModule("KidneyTumorSeg")
        self.widget = slicer.modules.kidneytumorseg.widgetRepresentation().self()
        self.parameters = self.widget._parameterNode

    def test_options_are_bound_both_ways(self):
        from KidneyTumorSeg import Device

        self.parameters.tta = True
        self.assertTrue(self.widget.ui.ttaCheckBox.checked)
        self.widget.ui.postprocessCheckBox.checked = False
        self.assertFalse(self.parameters.postprocess)
        self.parameters.device = Device.CPU
        self.assertEqual(self.widget.ui.deviceComboBox.currentText, Device.CPU.label())
        self.parameters.model = "/models/kidney.safetensors"
        self.assertEqual(self.widget.ui.modelLineEdit.text, "/models/kidney.safetensors")
        self.assertEqual(self.widget.ui.modelComboBox.currentData, "/models/kidney.safetensors")

    def test_apply_needs_an_input_volume(self):
        self.parameters.inputVolume = None
        self.assertFalse(self.widget.ui.applyButton.enabled)
        volume = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), np.int16), name="CT")
        self.parameters.inputVolume = volume
        self.assertIs(self.widget.ui.inputVolumeSelector.currentNode(), volume)
        self.assertTrue(self.widget.ui.applyButton.enabled)
        self.assertEqual(self.widget.ui.applyButton.text, "Apply")

    def test_new_segmentation_is_the_default_output(self):
        self.assertIsNone(self.parameters.outputSegmentation)
        self.assertIsNone(self.widget.ui.outputSegmentationSelector.currentNode())


if __name__ == "__main__":
    unittest.main()
