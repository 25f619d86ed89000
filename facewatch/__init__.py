"""facewatch: the installed namespace of the repository's packages.

The repository keeps the design's top-level folders (`daemon/ stages/ export/ training/`); they
are installed as `facewatch.daemon`, `facewatch.stages`, `facewatch.export` and
`facewatch.training` (pyproject's package-dir), so nothing of ours lands in site-packages under a
generic name (`daemon` is also python-daemon's module). In a source checkout the same names
resolve to those folders: the checkout's root is added to this package's search path.
"""
from pathlib import Path

_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "stages" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821  (a package's __path__)
