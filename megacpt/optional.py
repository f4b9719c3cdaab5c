"""Optional dependencies: "not installed" is told apart from "installed but broken".

An extra that is simply absent raises ``ModuleNotFoundError`` naming that module (or a parent package).
Anything else -- a CUDA-mismatched build raising at import, a missing symbol, a dependency of the extra
that is itself missing, a folder that shadows it -- is a broken installation, and the user must see the
real exception, never a "not installed" that sends them to reinstall something that is there.

- ``require(module, feature, hint)``: the module, or a ``UserError`` that says which of the two it is;
- ``optional(module, feature)``: the module, or None when it is not installed. A broken installation
  is still an error: the caller asked for the path whenever it is there, and a silent fallback would
  hide why it is slow;
- ``import_quietly(module)``: a module whose import tells of *its* optional extras being absent
  (megatron-core's Transformer Engine/Apex notices), imported without those notices.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import warnings
from types import ModuleType

from megacpt.errors import UserError


def is_absent(exc: BaseException, module: str) -> bool:
    """True when ``exc`` (raised by ``import module``) only says that ``module`` is not installed."""
    if type(exc) is not ModuleNotFoundError or not exc.name:
        return False
    return module == exc.name or module.startswith(exc.name + ".")


def broken(module: str, feature: str, exc: BaseException) -> UserError:
    """The error for an installed ``module`` that fails to import: its real exception, and where it lives."""
    where = ""
    try:
        spec = importlib.util.find_spec(module.split(".")[0])
        where = f" (found at {spec.origin or list(spec.submodule_search_locations or [])})" if spec else ""
    except Exception:  # noqa: BLE001 - finding the origin is best-effort; the import error is the message
        pass
    return UserError(f"{feature}: {module} is installed{where} but fails to import: "
                     f"{type(exc).__name__}: {exc}")


def optional(module: str, feature: str) -> ModuleType | None:
    """``import module``; None when it is not installed, ``UserError`` when it is installed but broken."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - CUDA-mismatched builds raise OSError/RuntimeError at import
        if is_absent(e, module):
            return None
        raise broken(module, feature, e) from e


def require(module: str, feature: str, hint: str) -> ModuleType:
    """``import module`` for ``feature``; ``UserError`` saying "not installed (hint)" or the real failure."""
    mod = optional(module, feature)
    if mod is None:
        raise UserError(f"{feature} needs {module.split('.')[0]}, which is not installed: {hint}")
    return mod


# what a third-party package says at import about its own optional accelerators (megatron-core: "Transformer
# Engine and Apex are not installed. Falling back to ..."): true of every CPU install, and not the user's
# business; real problems (a broken install, a deprecation) are still shown
_IMPORT_NOTICE = r".*\b(not installed|is not available)\b"


def import_quietly(module: str) -> ModuleType:
    """``import module`` without its import-time notices about missing optional accelerators.

    Scoped to this import, in this process: the UserWarnings of ``module``'s own package that say something
    "is not installed" are ignored and its loggers are held at WARNING while it imports; the warning filters
    and the logger level are restored afterwards (a user's own filters are never changed). A module
    imported before is returned as is (its notices, if any, were printed then).
    """
    top = module.split(".")[0]
    logger = logging.getLogger(top)
    level = logger.level
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_IMPORT_NOTICE, category=UserWarning,
                                module=rf"{re.escape(top)}(\.|$)")
        logger.setLevel(max(level, logging.WARNING))
        try:
            return importlib.import_module(module)
        finally:
            logger.setLevel(level)
