"""The output segments: label value, name, colour and DICOM terminology (SNOMED CT codes), shared by the
Slicer module (segments), the ``.seg.nrrd`` writer and the DICOM Segmentation writer. No Slicer, no Qt."""

from __future__ import annotations

from dataclasses import dataclass

from .laterality import LEFT_KIDNEY, RIGHT_KIDNEY
from .postprocessing import KIDNEY, TUMOR

TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
Code = tuple[str, str, str]  # (coding scheme, code value, code meaning)
_NO_CODE: Code = ("", "", "")
ANATOMICAL_STRUCTURE: Code = ("SCT", "123037004", "Anatomical Structure")
MORPHOLOGICALLY_ALTERED_STRUCTURE: Code = ("SCT", "49755003", "Morphologically Altered Structure")
KIDNEY_CODE: Code = ("SCT", "64033007", "Kidney")
NEOPLASM_CODE: Code = ("SCT", "108369006", "Neoplasm")
RIGHT_CODE: Code = ("SCT", "24028007", "Right")
LEFT_CODE: Code = ("SCT", "7771000", "Left")


def terminology_entry(category: Code, type_: Code, region: Code = _NO_CODE, modifier: Code = _NO_CODE) -> str:
    """A segment's terminology string, as Slicer's Terminologies module serializes it:
    ``context~SCT^value^meaning`` for category, type and type modifier, then the anatomic context, region
    and region modifier (``Testing/mrml`` checks it against Slicer's own serializer)."""
    codes = [category, type_, modifier, region, _NO_CODE]
    text = ["^".join(code) for code in codes]
    return "~".join([TERMINOLOGY_CONTEXT, *text[:3], ANATOMIC_CONTEXT, *text[3:]])


@dataclass(frozen=True)
class SegmentSpec:
    """One output segment: the label value in the command's label file, how Slicer shows it, and its
    codes (category, type, anatomic region, type modifier), from which the terminology string is made."""

    label: int
    name: str
    color_rgb255: tuple[int, int, int]
    category: Code
    type: Code
    region: Code = _NO_CODE
    modifier: Code = _NO_CODE

    @property
    def color(self) -> tuple[float, float, float]:
        return tuple(c / 255.0 for c in self.color_rgb255)  # type: ignore[return-value]

    @property
    def terminology(self) -> str:
        return terminology_entry(self.category, self.type, self.region, self.modifier)


# Colors: Slicer's generic anatomy colors for kidney and tumor (the QC pictures of overlay.py use the
# same; a test keeps the two equal).
_KIDNEY_COLOR = (185, 102, 83)
_TUMOR = SegmentSpec(
    TUMOR, "Tumor", (144, 238, 144), MORPHOLOGICALLY_ALTERED_STRUCTURE, NEOPLASM_CODE, region=KIDNEY_CODE
)
SEGMENTS: tuple[SegmentSpec, ...] = (
    SegmentSpec(KIDNEY, "Kidney", _KIDNEY_COLOR, ANATOMICAL_STRUCTURE, KIDNEY_CODE),
    _TUMOR,
)
# With "separate left and right kidney" (labels of ``laterality.split_kidneys``: 1 right, 2 tumor, 3 left);
# the left kidney a little lighter so the two can be told apart where they are drawn side by side.
SPLIT_SEGMENTS: tuple[SegmentSpec, ...] = (
    SegmentSpec(RIGHT_KIDNEY, "Kidney, right", _KIDNEY_COLOR, ANATOMICAL_STRUCTURE, KIDNEY_CODE, modifier=RIGHT_CODE),
    _TUMOR,
    SegmentSpec(LEFT_KIDNEY, "Kidney, left", (212, 140, 120), ANATOMICAL_STRUCTURE, KIDNEY_CODE, modifier=LEFT_CODE),
)


def segment_specs(split_kidneys: bool) -> tuple[SegmentSpec, ...]:
    return SPLIT_SEGMENTS if split_kidneys else SEGMENTS
