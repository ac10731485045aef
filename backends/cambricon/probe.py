"""What this machine has for Cambricon, each missing piece named: torch_mlu, the driver and
CNToolkit, a visible MLU, torch_mlu_ops and its pinned signatures, FP8 on the chip.

The backend is available when torch_mlu imports and sees an MLU; torch_mlu_ops (tmo) is optional:
without it (or with a release the signature table does not pin) every op runs on the portable path,
and the probe's reason says so. FP8 is probed by running one tiny ``scaled_matmul`` on the device,
fp32 rotary by one tiny ``apply_rotary``.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from pathlib import Path

import torch
from seahal.hal import Availability, emulated_placement

from . import tmo
from .signatures import UnpinnedVersionError

NEUWARE_DEFAULT = "/usr/local/neuware"
CHIPS = ("mlu370", "mlu590")
"""Chip families the kernels declare (vllm-mlu supports "MLU370 and above"; the docs' chip matrix)."""


def chip_family(device_name: str) -> str | None:
    """``"MLU590-M9"`` -> ``"mlu590"``; None when the name carries no MLU model number."""
    match = re.search(r"MLU\s*-?(\d{3})", device_name, re.IGNORECASE)
    return f"mlu{match[1]}" if match else None


def _toolkit_hint() -> str:
    home = os.environ.get("NEUWARE_HOME")
    if home and Path(home).is_dir():
        return f"CNToolkit found at NEUWARE_HOME={home}; check the driver (cnmon) and that torch_mlu matches torch"
    where = f"NEUWARE_HOME={home} does not exist" if home else f"NEUWARE_HOME is unset and {NEUWARE_DEFAULT} is missing"
    if not home and Path(NEUWARE_DEFAULT).is_dir():
        return f"CNToolkit found at {NEUWARE_DEFAULT}; check the driver (cnmon) and that torch_mlu matches torch"
    return f"CNToolkit not found ({where}); install the Cambricon driver and CNToolkit"


@functools.cache
def tmo_status() -> tuple[bool, str]:
    """(usable, explanation) for torch_mlu_ops; unusable means the portable path for every op."""
    try:
        tmo.module()
    except ImportError:
        return False, "torch_mlu_ops not installed: every op runs on the portable path"
    except Exception as exc:  # noqa: BLE001  (a broken vendor install must be explained, not raised)
        return False, f"torch_mlu_ops failed to import ({exc}): every op runs on the portable path"
    try:
        entry = tmo.release()
    except UnpinnedVersionError as exc:
        return False, str(exc)
    note = ", version attribution inferred" if entry.inferred else ""
    return True, f"torch_mlu_ops {tmo.version()} (signature table {entry.version}{note})"


@functools.cache
def fp8_gemm_works() -> str | None:
    """None if a 128x128 FP8 ``scaled_matmul`` runs on the device, else why not."""
    usable, why = tmo_status()
    if not usable:
        return why
    lacking = tmo.lacks("scaled_matmul", "a_quant_bit_size")
    if lacking:
        return lacking
    device = _tensor_device()
    try:
        a = torch.ones(1, 128, device=device).to(torch.float8_e4m3fn)
        b = torch.ones(1, 128, device=device).to(torch.float8_e4m3fn)
        one = torch.ones(1, 1, device=device)
        tmo.call("scaled_matmul", a=a, b=b, a_scale=one, b_scale=one, output_dtype=torch.bfloat16,
                 quant_bit_size=8, a_quant_bit_size=8)
    except Exception as exc:  # noqa: BLE001  (whatever tmo raises means: no FP8 matmul here)
        return f"FP8 scaled_matmul probe failed on this MLU: {type(exc).__name__}: {exc}"
    return None


@functools.cache
def fp32_rotary_works() -> str | None:
    """None if ``apply_rotary`` rotates float32 input with float32 tables on the device, else why not.

    The spec rotates in fp32. The v1.3.2 manual lists fp16/bf16 only, and bf16 tables would round
    cos/sin. Later callers pass float32, but no source says from which release, so this runs one
    tiny call on the device instead of trusting a version number."""
    usable, why = tmo_status()
    if not usable:
        return why
    lacking = tmo.lacks("apply_rotary")
    if lacking:
        return lacking
    device = _tensor_device()
    try:
        tmo.call("apply_rotary", input=torch.ones(1, 1, 1, 2, device=device), sin_cache=torch.zeros(1, 2, device=device),
                 cos_cache=torch.ones(1, 2, device=device), position_ids=torch.zeros(1, dtype=torch.int32, device=device),
                 cu_seqlens=None, interleaved=True, discrete=True, dynamic_ntk=False, max_seqlen=1)
    except Exception as exc:  # noqa: BLE001  (whatever tmo raises means: no fp32 rotary here)
        return f"fp32 apply_rotary probe failed on this MLU: {type(exc).__name__}: {exc}"
    return None


DEVICE_CHECKS = {
    "fp8_gemm": fp8_gemm_works, "act_quant_gemm": fp8_gemm_works, "rope": fp32_rotary_works,
    "rms_norm_rope": fp32_rotary_works,
}
"""Ops whose tmo kernel needs a capability probed on the device besides the pinned signature."""


def _tensor_device() -> str:
    torch_mlu = importlib.import_module("torch_mlu")
    return emulated_placement(torch_mlu) or "mlu"


def probe() -> Availability:
    """The backend's availability: torch_mlu importable with an MLU visible; tmo status in the reason."""
    try:
        torch_mlu = importlib.import_module("torch_mlu")
    except ImportError:
        return Availability(False, "torch_mlu is not installed (Cambricon ships it with its PyTorch build, not on PyPI)")
    except Exception as exc:  # noqa: BLE001  (e.g. OSError for a missing libcnrt.so: explain it)
        return Availability(False, f"torch_mlu failed to import: {exc} ({_toolkit_hint()})")
    mlu = getattr(torch, "mlu", None)
    if mlu is None or not mlu.is_available() or mlu.device_count() == 0:
        visible = os.environ.get("MLU_VISIBLE_DEVICES")
        env = f"MLU_VISIBLE_DEVICES={visible!r}" if visible is not None else "MLU_VISIBLE_DEVICES unset"
        return Availability(False, f"torch_mlu is installed but no MLU is visible ({env}; check the driver with cnmon)")
    name = mlu.get_device_name()
    placement = emulated_placement(torch_mlu)
    tmo_status.cache_clear()
    fp8_gemm_works.cache_clear()
    fp32_rotary_works.cache_clear()
    _, tmo_text = tmo_status()
    what = "TEST EMULATION of torch_mlu (tests/vendor_packages)" if placement else f"torch_mlu {torch_mlu.__version__}"
    return Availability(
        True, f"{what}, {mlu.device_count()} x {name}; {tmo_text}", chip=chip_family(name), emulated_on=placement
    )
