"""quantlab: a post-training quantization workbench for causal language models."""

import os as _os

__version__ = "0.1.0"

# quantlab.calibrators and quantlab.kernels live in the top-level folders calibrators/ and
# kernels/ (setuptools package-dir). An installed quantlab finds them through that mapping; code
# run from a source checkout (`python -m quantlab.kernels.bench` in the repository root puts
# ./quantlab first on sys.path) would not, so a checkout also searches its root for subpackages.
# Only the two mapped folders are packages there; nothing is added to sys.path.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isfile(
    _os.path.join(_root, "kernels", "__init__.py")
):
    __path__.append(_root)
