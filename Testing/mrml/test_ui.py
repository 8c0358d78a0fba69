"""The panel cannot be shown here (no Qt): its ``.ui`` file and the module code are read as text instead.

Checks that every widget the module code touches exists in the ``.ui`` with the class the code expects,
that every parameter-node field has a widget bound to it through ``SlicerParameterName`` whose class the
parameter-node wrapper can connect to that field's type, and that the MRML widgets get the scene.
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "KidneyTumorSeg"
MODULE_PY = MODULE_DIR / "KidneyTumorSeg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "KidneyTumorSeg.ui"

# The class each widget the code uses must have: the code calls methods and sets properties of that class.
EXPECTED_CLASSES = {
    "inputsCollapsibleButton": "ctkCollapsibleButton",
    "optionsCollapsibleButton": "ctkCollapsibleButton",
    "outputsCollapsibleButton": "ctkCollapsibleButton",
    "resultsCollapsibleButton": "ctkCollapsibleButton",
    "modelComboBox": "QComboBox",
    "modelDescriptionLabel": "QLabel",
    "deviceDescriptionLabel": "QLabel",
    "applyButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "resultsTableView": "qMRMLTableView",
    "measurementsTableView": "qMRMLTableView",
    "editInSegmentEditorButton": "QPushButton",
    "logTextEdit": "QPlainTextEdit",
}

# Which widget classes Slicer's parameter-node wrapper connects to which field types (its GUI connectors
# compare the exact class).
CONNECTABLE = {
    "bool": {"QCheckBox", "QPushButton"},
    "str": {"QLineEdit", "QTextEdit"},
    "int": {"QSpinBox", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "enum": {"QComboBox"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
}


def _ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()  # noqa: S314 - the project's own file, not untrusted input


def _ui_widgets() -> dict[str, ET.Element]:
    root = _ui_root()
    widgets = root.iter("widget")
    found: dict[str, ET.Element] = {}
    for widget in widgets:
        name = widget.get("name")
        assert name not in found, f"widget name {name!r} is used twice in {UI_FILE.name}"
        found[name] = widget
    return found


def _parameter_name(widget: ET.Element) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == "SlicerParameterName":
            return prop.findtext("string")
    return None


def _module_tree() -> ast.Module:
    return ast.parse(MODULE_PY.read_text(encoding="utf-8"))


def _widgets_used_by_code() -> set[str]:
    used = set()
    for node in ast.walk(_module_tree()):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            used.add(node.attr)
    return used


def _enum_classes(tree: ast.Module) -> set[str]:
    return {
        c.name
        for c in tree.body
        if isinstance(c, ast.ClassDef) and any(ast.unparse(b) in ("enum.Enum", "Enum") for b in c.bases)
    }


def _parameter_fields() -> dict[str, str]:
    """Field name -> kind ('bool', 'str', 'enum', 'node', ...) of the @parameterNodeWrapper class."""
    tree = _module_tree()
    enums = _enum_classes(tree)
    wrapped = [
        c
        for c in tree.body
        if isinstance(c, ast.ClassDef) and any(ast.unparse(d) == "parameterNodeWrapper" for d in c.decorator_list)
    ]
    assert len(wrapped) == 1, "expected one @parameterNodeWrapper class"
    fields = {}
    for statement in wrapped[0].body:
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            annotation = ast.unparse(statement.annotation)
            if annotation.startswith("Annotated["):
                annotation = annotation[len("Annotated[") :].split(",")[0]
            if annotation.split(".")[-1].startswith("vtkMRML"):
                kind = "node"
            elif annotation in enums:
                kind = "enum"
            elif annotation.split(".")[-1] == "Path":
                kind = "Path"
            else:
                kind = annotation
            fields[statement.target.id] = kind
    return fields


def test_every_widget_the_code_uses_exists_with_the_expected_class():
    widgets = _ui_widgets()
    used = _widgets_used_by_code()
    unexpected = sorted(used - set(EXPECTED_CLASSES))
    assert not unexpected, f"the code uses widgets this test does not know the class of: {unexpected}"
    for name in sorted(used):
        assert name in widgets, f"the code uses self.ui.{name}, which {UI_FILE.name} does not define"
        assert widgets[name].get("class") == EXPECTED_CLASSES[name], (
            f"{name} is a {widgets[name].get('class')} in {UI_FILE.name}; the code expects {EXPECTED_CLASSES[name]}"
        )


def test_every_parameter_field_has_a_bound_widget_of_a_connectable_class():
    fields = _parameter_fields()
    assert fields, "no parameter-node fields found"
    bound = {}
    for name, widget in _ui_widgets().items():
        parameter = _parameter_name(widget)
        if parameter is not None:
            assert parameter not in bound, f"{parameter!r} is bound to both {bound[parameter][0]} and {name}"
            bound[parameter] = (name, widget.get("class"))
    for field, kind in fields.items():
        assert field in bound, f"parameter-node field {field!r} has no widget with SlicerParameterName={field!r}"
        widget_name, widget_class = bound[field]
        assert widget_class in CONNECTABLE[kind], (
            f"{widget_name} ({widget_class}) cannot be bound to {field!r} of type {kind}: use one of "
            f"{sorted(CONNECTABLE[kind])}"
        )
    stray = sorted(set(bound) - set(fields))
    assert not stray, f"widgets bound to names that are no parameter-node field: {stray}"


def test_mrml_widgets_receive_the_scene():
    root = _ui_root()
    top = root.find("widget").get("name")
    receivers = {
        c.findtext("receiver")
        for c in root.iter("connection")
        if c.findtext("sender") == top
        and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    mrml_widgets = {n for n, w in _ui_widgets().items() if w.get("class", "").startswith("qMRML") and n != top}
    assert mrml_widgets, "no MRML widgets found"
    assert mrml_widgets <= receivers, f"MRML widgets without the scene: {sorted(mrml_widgets - receivers)}"


def test_custom_widget_classes_are_declared():
    root = _ui_root()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    custom = {c for c in used if c.startswith(("ctk", "qMRML", "qSlicer"))}
    assert custom <= declared, f"undeclared custom widget classes: {sorted(custom - declared)}"


@pytest.mark.parametrize("attribute", ["text", "toolTip", "title", "helpText", "acknowledgementText"])
def test_user_facing_strings_go_through_translation(attribute):
    """A plain string assigned to a widget's text or tooltip would escape translation; only _() calls (or
    computed values) may be assigned."""
    offenders = []
    for node in ast.walk(_module_tree()):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and target.attr == attribute:
                    value = node.value
                    if isinstance(value, ast.Constant) and isinstance(value.value, str) and value.value:
                        offenders.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not offenders, "untranslated strings: " + "; ".join(offenders)
