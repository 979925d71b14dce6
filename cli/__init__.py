"""flashvl-edge: export, quantize, build and run Flash-VL on NVIDIA edge devices.

The distribution installs four import packages, mapped from the repository's top-level folders:
``flashvl_edge`` (this folder, ``cli/``: the ``flashvl`` command), ``flashvl_edge.export``,
``flashvl_edge.runtime`` and ``flashvl_edge.calibration``.
"""

__version__ = "0.1.0"
