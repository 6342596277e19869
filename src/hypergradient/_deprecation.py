"""Old import paths that keep working for one release, with a :class:`DeprecationWarning`
naming the new path.

A moved package leaves behind a one-line ``__init__.py`` that calls :func:`moved`: the old
module object in :data:`sys.modules` is replaced by the new one (so ``import old`` and
``from old import name`` give exactly the new objects, never copies), and each of the old
submodules is registered under its old dotted name as well (``from old.sub import name``).
The warning is raised once per process, at the first import of the old path, with
``stacklevel`` pointing at the user's import line.
"""

from __future__ import annotations

import importlib
import sys
import warnings

#: old package -> new package, relative to ``hypergradient`` (the map on the site's
#: architecture page)
MOVED = {
    "optim": "diffopt",
    "kfac": "optimizers.kfac",
    "towers": "optimizers.towers",
}


def moved(old: str, submodules: tuple[str, ...] = ()) -> None:
    """Make the package ``old`` (a full dotted name) an alias of its new home.

    Examples:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     import hypergradient.optim as old
        >>> import hypergradient.diffopt as new
        >>> old is new
        True
    """
    short = old.removeprefix("hypergradient.")
    new = f"hypergradient.{MOVED[short]}"
    warnings.warn(
        f"{old} has moved to {new}: import {new} instead ({old} keeps working, with this "
        f"warning, until the next release).",
        DeprecationWarning,
        stacklevel=_user_frame(),
    )
    target = importlib.import_module(new)
    sys.modules[old] = target
    for sub in submodules:
        sys.modules[f"{old}.{sub}"] = importlib.import_module(f"{new}.{sub}")


def _user_frame() -> int:
    """The ``stacklevel`` of the user's ``import`` line: the first frame outside this module
    and the package's ``__init__.py`` files.  :func:`warnings.warn` skips the import
    machinery's own frames when it counts, so they are not counted here either."""
    frame, level = sys._getframe(1), 1  # level 1: moved(), which calls warnings.warn
    while frame is not None:
        name = frame.f_code.co_filename
        internal = "importlib" in name and "_bootstrap" in name
        if not internal:
            ours = name.endswith("_deprecation.py") or (
                name.endswith("__init__.py") and "hypergradient" in name
            )
            if not ours:
                return level
            level += 1
        frame = frame.f_back
    return 2
