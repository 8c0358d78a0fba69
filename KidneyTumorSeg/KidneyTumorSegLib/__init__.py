"""KidneyTumorSegLib: the core of KidneyTumorSeg (no Qt, no Slicer).

Segments the kidneys and kidney tumors in a CT volume with a 3D DeepLab v3+. For research use only,
not for clinical diagnosis.
"""

__version__ = "0.2.0"
