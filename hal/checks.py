"""Argument validation for operator contracts.

Every helper raises :class:`SpecError` with the op name, the argument name, what was expected and
what was given, e.g. ``fp8_block_gemm: a must be [M, K] float8_e4m3fn, got [2, 7, 64] float32 on
cpu``. They only read metadata, so they work on real, fake and meta tensors alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .errors import SpecError
from .formats import E8M0_DTYPE

Dim = int | str | None
"""A dimension in an expected shape: an int (must match), a name (bound on first sight and must
match later uses of the same name), or None (anything)."""


def describe(t: torch.Tensor) -> str:
    """``[2, 7, 64] bfloat16 on cpu`` for error messages."""
    return f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Contract:
    """Collects dimension bindings while the arguments of one call are checked.

    ``c = Contract("fp8_block_gemm"); c.tensor("a", a, ["M", "K"], dtypes=FP8)`` binds M and K;
    a later ``c.tensor("b", b, ["N", "K"], ...)`` then requires the same K.
    """

    def __init__(self, op: str):
        self.op = op
        self.dims: dict[str, int] = {}
        self.device: torch.device | None = None
        self._device_arg: str | None = None

    def fail(self, message: str) -> SpecError:
        return SpecError(f"{self.op}: {message}")

    def tensor(
        self,
        name: str,
        t: object,
        shape: Sequence[Dim] | None = None,
        dtypes: Iterable[torch.dtype] | None = None,
        *,
        min_rank: int | None = None,
        contiguous: bool = False,
        same_device: bool = True,
    ) -> torch.Tensor:
        """Check one tensor argument and bind its named dimensions."""
        if not isinstance(t, torch.Tensor):
            raise self.fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        dtypes = tuple(dtypes) if dtypes is not None else None
        if dtypes is not None and t.dtype not in dtypes:
            raise self.fail(f"{name} must be {self._expected(shape, dtypes)}, got {describe(t)}")
        if min_rank is not None and t.dim() < min_rank:
            raise self.fail(f"{name} must have at least {min_rank} dims, got {describe(t)}")
        if shape is not None:
            if t.dim() != len(shape):
                raise self.fail(f"{name} must be {self._expected(shape, dtypes)}, got {describe(t)}")
            fresh = []  # dims this tensor binds: its mismatch message states the shape before them
            for dim, size in zip(shape, t.shape):
                if isinstance(dim, int) and size != dim:
                    raise self.fail(f"{name} must be {self._expected(shape, dtypes, fresh)}, got {describe(t)}")
                if isinstance(dim, str):
                    if dim not in self.dims:
                        fresh.append(dim)
                    bound = self.dims.setdefault(dim, int(size))
                    if bound != size:
                        raise self.fail(
                            f"{name} must be {self._expected(shape, dtypes)} "
                            f"(with {dim}={bound} from an earlier argument), got {describe(t)}"
                        )
        if contiguous and not t.is_contiguous():
            raise self.fail(f"{name} must be contiguous, got strides {list(t.stride())}")
        if same_device:
            if self.device is None:
                self.device, self._device_arg = t.device, name
            elif t.device != self.device:
                raise self.fail(
                    f"{name} must be on {self.device} like {self._device_arg}, got {describe(t)}"
                )
        return t

    def optional(self, name: str, t: object, *args, **kwargs) -> torch.Tensor | None:
        return None if t is None else self.tensor(name, t, *args, **kwargs)

    def require(self, condition: bool, message: str) -> None:
        if not condition:
            raise self.fail(message)

    def divisible(self, dim: str, by: int, why: str = "") -> None:
        value = self.dims[dim]
        if value % by:
            hint = f" ({why})" if why else ""
            raise self.fail(f"{dim} must be a multiple of {by}{hint}, got {dim}={value}")

    def choice(self, name: str, value: object, allowed: Iterable[object]) -> None:
        allowed = tuple(allowed)
        if value not in allowed:
            raise self.fail(f"{name} must be one of {list(allowed)}, got {value!r}")

    def position(self, name: str, value: object, batch: str = "B") -> int | None:
        """A token position: an int >= 0 (returned), or an integer tensor on the op's device, 0-d
        (every sequence) or [batch] (one position per sequence; None returned). A tensor's value is
        data the kernel reads on the device: it is never read here, so a range the contract would
        check is the caller's to keep."""
        if isinstance(value, torch.Tensor):
            self.tensor(name, value, None, INDEX)
            if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != self.dims[batch]):
                raise self.fail(
                    f"{name} must be an int, a 0-d tensor or [{batch}={self.dims[batch]}] (a position per "
                    f"sequence), got {describe(value)}"
                )
            return None
        if not isinstance(value, int) or value < 0:
            raise self.fail(f"{name} must be an int >= 0 or a 0-d int32/int64 tensor, got {value!r}")
        return value

    def positive(self, name: str, value: int) -> None:
        if not isinstance(value, int) or value <= 0:
            raise self.fail(f"{name} must be a positive int, got {value!r}")

    def _expected(self, shape: Sequence[Dim] | None, dtypes: tuple[torch.dtype, ...] | None,
                  unbound: Sequence[str] = ()) -> str:
        """The expected shape and dtypes for a message (built only when a check fails), each named
        dimension with its bound size unless it is in ``unbound``."""
        parts = []
        if shape is not None:
            dims = []
            for d in shape:
                if isinstance(d, str) and d in self.dims and d not in unbound:
                    dims.append(f"{d}={self.dims[d]}")
                else:
                    dims.append("*" if d is None else str(d))
            parts.append("[" + ", ".join(dims) + "]")
        if dtypes is not None:
            parts.append(" or ".join(dtype_name(d) for d in dtypes))
        return " ".join(parts) if parts else "a tensor"


FLOATS = (torch.bfloat16, torch.float16, torch.float32)
FLOAT_HIGH = (torch.bfloat16, torch.float32, torch.float64)
FP8 = (torch.float8_e4m3fn,)
E8M0 = (E8M0_DTYPE,) if E8M0_DTYPE is not None else ()
SCALES = (torch.float32,) + E8M0
"""Block scales: fp32 (any value, or powers of two for ue8m0) or the raw e8m0 exponent byte."""
INDEX = (torch.int32, torch.int64)


def check_rotation(c: Contract, positions: object, freqs: object) -> None:
    """A RoPE's operands, after the rotated tensor [B, S, H, D]: positions [B, S] int, freqs [R]
    fp32/fp64 with 2R <= D: the ``rope`` and ``rms_norm_rope`` contracts, and the attention
    output's inverse rotation."""
    c.tensor("positions", positions, ["B", "S"], INDEX)
    c.tensor("freqs", freqs, ["R"], (torch.float32, torch.float64))
    c.require(2 * c.dims["R"] <= c.dims["D"], f"freqs covers {2 * c.dims['R']} dims, more than D={c.dims['D']}")


def check_norm_parameters(c: Contract, weight: object, eps: object) -> None:
    """An RMSNorm's weight ([D] fp32/fp64, or None; D bound by x) and eps (a float >= 0): the
    ``rms_norm`` and ``rms_norm_rope`` contracts."""
    c.optional("weight", weight, ["D"], (torch.float32, torch.float64))
    c.require(isinstance(eps, float) and eps >= 0.0, f"eps must be a float >= 0, got {eps!r}")
