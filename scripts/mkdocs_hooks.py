"""mkdocs hooks: ship the MathJax renderer from an installed Python package.

``pymdownx.arithmatex`` marks formulas; MathJax 3 (``tex-svg.js``, one self-contained file whose
SVG output needs no web fonts) renders them in the browser. The file comes from the
``django-static-mathjax`` package (a dependency of the ``docs`` extra), so the site needs no CDN
and reads the same offline.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

MATHJAX = "js/tex-svg.js"


def mathjax_file() -> Path:
    """The path of MathJax's ``tex-svg.js`` inside the installed ``django-static-mathjax``."""
    spec = find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        raise PluginError("the docs need MathJax from the 'django-static-mathjax' package: pip install -e '.[docs]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax" / "es5" / "tex-svg.js"
    if not path.is_file():
        raise PluginError(f"{path} is missing: reinstall django-static-mathjax (pip install -e '.[docs]')")
    return path


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, MATHJAX, abs_src_path=str(mathjax_file())))
    return files
