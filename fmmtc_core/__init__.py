"""FMM-TC Screen core package.

The folder layout follows the data flow: ``io -> atlas -> preprocess -> connectivity -> qc``
(then models, explain, store and the dashboard). Every stage exchanges plain dataclasses.
"""

__version__ = "0.1.0"

from fmmtc_core._errors import FMMTCError, InvalidInputError  # noqa: E402

__all__ = ["FMMTCError", "InvalidInputError", "__version__"]
