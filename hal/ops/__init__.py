"""Operator specs, one module per family of ``shared/spec/v4_ops.md``.

Importing this package defines every spec; kernels live in the backends.
"""

from . import quant  # noqa: F401  (isort: skip — the import order is the order ops are listed in)
from . import gemm  # noqa: F401
from . import moe  # noqa: F401
from . import compressor  # noqa: F401
from . import indexer  # noqa: F401
from . import attention  # noqa: F401
from . import mhc  # noqa: F401
from . import rope  # noqa: F401
from . import norm  # noqa: F401
from . import linear  # noqa: F401
