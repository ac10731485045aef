"""The one door to torch_mlu_ops: keyword-only calls checked against the pinned signature table.

Every kernel of this backend calls tmo as ``call("moe_softplus_topk", input=..., topk=...)``.
Before the call reaches tmo, the keywords are checked against the installed release's entry in
:mod:`.signatures`: a function the release lacks, an unknown keyword or a missing required
parameter raises :class:`TmoCallError` naming the function, the release and the table's source,
instead of tmo binding a value to the wrong parameter. Importing this module imports nothing
from Cambricon; ``torch_mlu_ops`` is imported on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

from .signatures import Release, entry_for

MODULE = "torch_mlu_ops"


class TmoCallError(RuntimeError):
    """A tmo call that does not match the installed release's pinned signature."""


def installed() -> bool:
    return importlib.util.find_spec(MODULE) is not None


def module() -> ModuleType:
    """``torch_mlu_ops`` (imported on first use; later calls are a ``sys.modules`` lookup)."""
    return importlib.import_module(MODULE)


def version() -> str:
    return str(getattr(module(), "__version__", "unknown"))


def release() -> Release:
    """The installed release's table entry (raises ``UnpinnedVersionError`` if not pinned)."""
    return entry_for(version())


def lacks(function: str, *params: str) -> str | None:
    """Why the installed release cannot take ``function(**params)``, or None if its table entry
    has the function with those parameters."""
    signature = release().functions.get(function)
    if signature is None:
        return f"torch_mlu_ops {version()} has no {function}"
    absent = [p for p in params if p not in signature.names]
    if absent:
        return f"torch_mlu_ops {version()}'s {function} takes no {', '.join(absent)}"
    return None


def call(function: str, **kwargs: Any) -> Any:
    """``torch_mlu_ops.<function>(**kwargs)`` after checking the keywords against the table."""
    entry = release()
    signature = entry.functions.get(function)
    if signature is None:
        raise TmoCallError(
            f"torch_mlu_ops {version()} has no {function} in seahal's signature table "
            f"(release {entry.version} lists: {', '.join(sorted(entry.functions))})"
        )
    problems = signature.problems(kwargs)
    if problems:
        raise TmoCallError(
            f"torch_mlu_ops.{function} call does not match release {entry.version} "
            f"({signature.source}): {'; '.join(problems)}; parameters are {list(signature.names)}"
        )
    return getattr(module(), function)(**kwargs)
