"""Applications of a trained model (docs/method.md#applications, with the reference's bugs fixed):
expression transfer, identity/expression interpolation, face recognition, headless figures.

Run ``python -m facedis.apps --help``. Modules: ``transfer``, ``interpolate``, ``recognition``,
``figures`` (``error_map_image`` for TensorBoard), ``grid`` (grids of faces), ``render``
(numpy/matplotlib renderer), ``common`` (reading a split). The model side is ``facedis.inference`` (``facedis.load``).
Importing this package is cheap; the modules import matplotlib/torch when used.
"""
