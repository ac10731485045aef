"""Load-time plans: kernel choice by priority, capabilities and predicates (with the reasons
recorded), fallback and strict policies, the summary line, environment overrides, device
resolution, and that calls through a plan never touch the registry."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from seahal import hal
from seahal.backends.cpu.reference.rope import rope as reference_rope
from seahal.hal.registry import REGISTRY
from seahal.testing.examples import example_args

ROPE = "seahal.backends.cpu.reference.rope:rope"
HAL_DIR = Path(hal.__file__).parent
QUIET: dict[str, str] = {}  # an environment with no overrides


def _backend(name: str, device_type: str = "cpu", *, ok: bool = True, chip: str | None = None, priority: int = 0):
    reason = "fake device found" if ok else "fake driver missing"
    return hal.register_backend(
        name, device_type=device_type, probe=lambda: hal.Availability(ok, reason, chip=chip), priority=priority
    )


def _plan(device, ops, policy="fallback", environ=QUIET):
    return hal.plan(device, ops=ops, policy=policy, announce=False, environ=environ)


@pytest.fixture
def spyvendor(reference_registry):
    """A second cpu backend with two rope kernels above the reference (they run the reference)."""
    _backend("spyvendor")
    hal.register_kernel("rope", "spyvendor", "slow", ROPE, priority=5)
    hal.register_kernel("rope", "spyvendor", "fast", ROPE, priority=20)
    return reference_registry


@pytest.fixture
def nullvendor(reference_registry):
    """An available backend for the meta device with no kernels at all."""
    _backend("nullvendor", device_type="meta", priority=1)
    return reference_registry


# -- choosing kernels ---------------------------------------------------------------------------


def test_highest_priority_wins_and_the_others_are_explained(spyvendor):
    entry = _plan("cpu", ["rope"]).entries["rope"]
    assert entry.label == "spyvendor.fast"
    assert entry.reason == "highest priority (20) for cpu"
    assert entry.rejected == [("spyvendor.slow", "lower priority (5)"), ("cpu.reference", "lower priority (0)")]
    assert not entry.fallback


def test_reregistering_a_kernel_name_binds_the_new_function(reference_registry):
    """torch ops cannot be redefined: the new function must still be the one a plan runs."""
    _backend("swapvendor")
    calls = []

    def first(x, positions, freqs, inverse=False):
        calls.append("first")
        return reference_rope(x, positions, freqs, inverse)

    def second(x, positions, freqs, inverse=False):
        calls.append("second")
        return reference_rope(x, positions, freqs, inverse)

    args, kwargs = example_args("rope")
    for fn in (first, second):
        hal.register_kernel("rope", "swapvendor", "k", fn, priority=50)
        _plan("cpu", ["rope"]).ops.rope(*args, **kwargs)
    assert calls == ["first", "second"]


def test_capabilities_chip_and_predicates_reject_with_reasons(reference_registry):
    _backend("chipvendor", chip="sm90", priority=50)
    hal.register_kernel("rope", "chipvendor", "sm100", ROPE, priority=40, capabilities={"chip": ("sm100",)})
    hal.register_kernel("rope", "chipvendor", "f32", ROPE, priority=30, capabilities={"dtype": ("float32",)})
    hal.register_kernel(
        "rope",
        "chipvendor",
        "wide",
        ROPE,
        priority=20,
        supports=lambda ctx: None if ctx.requirements.get("head_dim") == 512 else "needs head_dim 512",
    )
    _backend("offvendor", ok=False)
    hal.register_kernel("rope", "offvendor", "any", ROPE, priority=60)

    bf16 = _plan("chipvendor", {"rope": {"dtype": "bfloat16", "head_dim": 64}}).entries["rope"]
    assert bf16.label == "cpu.reference"
    assert bf16.rejected == [
        ("offvendor.any", "backend unavailable: fake driver missing"),
        ("chipvendor.sm100", "chip sm90 not in ['sm100']"),
        ("chipvendor.f32", "dtype='bfloat16' not in ['float32']"),
        ("chipvendor.wide", "needs head_dim 512"),
    ]

    f32 = _plan("chipvendor", {"rope": {"dtype": "float32", "head_dim": 512}}).entries["rope"]
    assert f32.label == "chipvendor.f32"
    assert f32.rejected[-2:] == [("chipvendor.wide", "lower priority (20)"), ("cpu.reference", "lower priority (0)")]


def test_portable_kernel_of_another_backend_is_listed_when_not_needed(reference_registry):
    _backend("portvendor", device_type="meta")
    hal.register_kernel("rope", "portvendor", "anywhere", ROPE, priority=50, portable=True)
    entry = _plan("cpu", ["rope"]).entries["rope"]
    assert entry.label == "cpu.reference"
    assert entry.rejected == [("portvendor.anywhere", "portable fallback, not needed on cpu")]


def test_fallback_warns_and_runs_portable_kernels(nullvendor):
    with pytest.warns(RuntimeWarning, match=r"2 op\(s\) have no meta kernel .* fallback: rope, hc_head$"):
        p = _plan("nullvendor", ["rope", "hc_head"])
    assert p.device == torch.device("meta") and p.backend.name == "nullvendor"
    assert p.fallbacks == ["rope", "hc_head"]
    assert {e.label for e in p.entries.values()} == {"cpu.reference"}
    assert p.entries["rope"].reason == "no meta kernel: portable fallback"
    assert p.summary() == "plan(meta): 2 ops cpu.reference [fallback: rope, hc_head]"
    args, _ = example_args("rope", device="meta")
    out = p.ops.rope(*args)
    assert out.device.type == "meta" and out.shape == args[0].shape


def test_strict_policy_raises_where_fallback_warns(nullvendor):
    with pytest.raises(hal.PlanError, match=r"policy='strict': no meta kernel for 'rope' .*would run cpu\.reference"):
        _plan("nullvendor", ["rope"], policy="strict")


def test_no_kernel_at_all_is_an_error_under_either_policy(nullvendor):
    del REGISTRY.kernels["rope"]
    for policy in ("fallback", "strict"):
        with pytest.raises(hal.PlanError, match="no kernel can run 'rope' on meta: no meta kernel registered"):
            _plan("nullvendor", ["rope"], policy=policy)


def test_unknown_policy_and_op_names():
    with pytest.raises(hal.PlanError, match="policy must be one of"):
        _plan("cpu", ["rope"], policy="lenient")
    with pytest.raises(KeyError, match=r"unknown op 'ropes'; known ops: .*rope"):
        _plan("cpu", ["ropes"])
    with pytest.raises(KeyError, match="unknown op 'ropes'"):
        _plan("cpu", {"ropes": {}})


# -- summary and announcement -------------------------------------------------------------------


def test_summary_line_counts_kernels_most_used_first(spyvendor, capsys):
    p = hal.plan("cpu", ops=["rope", "hc_post", "hc_head"], environ=QUIET)
    line = "plan(cpu): 2 ops cpu.reference, 1 op spyvendor.fast"
    assert p.summary() == line
    assert capsys.readouterr().err == line + "\n"  # announce=True prints it once, to stderr
    assert str(p).splitlines()[0] == line
    assert "spyvendor.slow: lower priority (5)" in str(p)  # the table explains the losers
    assert p.to_dict()["ops"]["rope"]["kernel"] == "spyvendor.fast"

    hal.plan("cpu", ops=["rope"], environ={"SEAHAL_QUIET": "1"})
    assert capsys.readouterr().err == ""


# -- environment overrides ----------------------------------------------------------------------


def test_seahal_backend_forces_every_op(spyvendor):
    entry = _plan("cpu", ["rope"], environ={"SEAHAL_BACKEND": "cpu"}).entries["rope"]
    assert entry.label == "cpu.reference"
    assert entry.reason == "override cpu"
    assert entry.rejected == [
        ("spyvendor.fast", "override selects cpu"),
        ("spyvendor.slow", "override selects cpu"),
    ]


def test_seahal_ops_selects_a_kernel_and_wins_over_seahal_backend(spyvendor):
    env = {"SEAHAL_BACKEND": "cpu", "SEAHAL_OPS": " rope = spyvendor.slow , "}
    p = _plan("cpu", ["rope", "hc_head"], environ=env)
    assert p.entries["rope"].label == "spyvendor.slow"
    assert p.entries["rope"].reason == "override spyvendor.slow"
    assert p.entries["hc_head"].reason == "override cpu"


def test_override_to_a_portable_kernel_is_not_a_fallback(nullvendor, recwarn):
    p = _plan("nullvendor", ["rope"], policy="strict", environ={"SEAHAL_OPS": "rope=cpu"})
    assert p.entries["rope"].label == "cpu.reference" and not p.entries["rope"].fallback
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("value", ["rope", "rope=", "=cpu", "rope:cpu", "rope= ,hc_head=cpu"])
def test_malformed_seahal_ops(value):
    with pytest.raises(hal.PlanError, match=r"SEAHAL_OPS entry .* must look like op=backend or op=backend\.kernel"):
        _plan("cpu", ["rope"], environ={"SEAHAL_OPS": value})


def test_seahal_ops_with_unknown_op_or_backend():
    with pytest.raises(KeyError, match="unknown op 'ropes'"):
        _plan("cpu", ["rope"], environ={"SEAHAL_OPS": "ropes=cpu"})
    with pytest.raises(hal.PlanError, match="no kernel can run 'rope' on cpu: cpu.reference: override selects nosuch"):
        _plan("cpu", ["rope"], environ={"SEAHAL_OPS": "rope=nosuch"})


# -- the call path ------------------------------------------------------------------------------


def test_calls_through_a_plan_do_no_registry_lookup(monkeypatch):
    p = _plan("cpu", ["rope"])
    args, _ = example_args("rope")

    def lookup(*args, **kwargs):
        raise AssertionError("registry lookup during a call")

    monkeypatch.setattr(REGISTRY, "kernels_for", lookup)
    monkeypatch.setattr(REGISTRY, "discover", lookup)
    monkeypatch.setattr(hal.spec, "get_spec", lookup)
    monkeypatch.setattr(hal.spec, "specs", lookup)
    monkeypatch.setattr(sys.modules["seahal.hal.plan"], "get_spec", lookup)  # hal.plan is the function
    assert p["rope"] is p.ops.rope
    assert torch.equal(p.ops.rope(*args), reference_rope(*args))


# -- device resolution --------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "cpu:0"])
def test_cpu_resolves(device):
    torch_device, backend = hal.resolve_device(device)
    assert torch_device.type == "cpu" and backend.name == "cpu"


def test_auto_picks_the_best_available_backend(isolated_registry):
    available = [b for b in hal.backends().values() if b.availability()]
    assert hal.resolve_device("auto")[1] is min(available, key=lambda b: (-b.priority, b.name))
    _backend("bestvendor", device_type="meta", priority=99)
    assert hal.resolve_device("auto") == (torch.device("meta"), hal.backends()["bestvendor"])
    assert hal.resolve_device(None)[1].name == "bestvendor"


def test_auto_with_nothing_available(isolated_registry):
    REGISTRY.backends.clear()
    _backend("offvendor", ok=False)
    with pytest.raises(hal.DeviceError, match="no backend is available here:\n  offvendor .*fake driver missing"):
        hal.resolve_device("auto")


@pytest.mark.parametrize("name", ["tpu", "cpux", torch.device("meta")])
def test_unknown_device_lists_the_backends(name):
    with pytest.raises(hal.DeviceError) as err:
        hal.resolve_device(name)
    message = str(err.value)
    assert message.startswith(f"unknown device '{name}'; seahal knows these backends:")
    for backend in hal.backends().values():
        assert f"  {backend.name} (device type '{backend.device_type}'): " in message


@pytest.mark.parametrize(
    "name, backend",
    [
        ("cuda", "cuda"),
        ("cuda:1", "cuda"),
        ("ascend", "ascend"),
        ("npu:0", "ascend"),
        ("cambricon", "cambricon"),
        ("mlu", "cambricon"),
    ],
)
def test_unavailable_device_gives_the_probe_reason(name, backend):
    probe = hal.backends()[backend].availability()
    if probe:
        pytest.skip(f"{backend} is available on this machine")
    with pytest.raises(hal.DeviceError) as err:
        hal.resolve_device(name)
    assert str(err.value).startswith(f"device '{name}' is not available: {probe.reason}\n")
    assert "  cpu (device type 'cpu'): available" in str(err.value)


@pytest.mark.parametrize("name", ["cpu:x", "cpu:-1", "cpu:", "cpu:1.5"])
def test_bad_device_index(name):
    with pytest.raises(hal.DeviceError, match="index after ':' must be a non-negative integer"):
        hal.resolve_device(name)


def test_device_index_out_of_range():
    with pytest.raises(hal.DeviceError, match=r"index 7 out of range, 1 cpu device\(s\) visible"):
        hal.resolve_device("cpu:7")


# -- layering -----------------------------------------------------------------------------------


def test_importing_hal_loads_no_backend_and_no_model():
    code = (
        "import sys, seahal.hal\n"
        "print(sorted(m for m in sys.modules if m.startswith(('seahal.backends', 'seahal.model'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def _imported_modules(path: Path) -> list[str]:
    """Absolute names of the modules a file imports (relative imports resolved)."""
    package = "seahal." + ".".join(path.parent.relative_to(HAL_DIR.parent).parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, (base, node.module)))
            found += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return found


def test_hal_sources_import_no_backend_and_no_model():
    files = sorted(HAL_DIR.rglob("*.py"))
    assert HAL_DIR / "plan.py" in files and HAL_DIR / "ops" / "moe.py" in files
    assert "seahal.hal.registry.REGISTRY" in _imported_modules(HAL_DIR / "plan.py")  # resolves relative imports
    for path in files:
        bad = [m for m in _imported_modules(path) if m.startswith(("seahal.backends", "seahal.model"))]
        assert not bad, f"{path.relative_to(HAL_DIR.parent)} imports {bad}"


def test_portable_fallback_runs_the_portable_kernel_warns_once_and_counts(reference_registry):
    """A backend's per-call escape hatch gets the op's portable kernel (the reference's function
    itself), one warning per (backend, op, reason), and every call counted."""
    from seahal.backends.cpu.reference.rope import rope
    from seahal.hal.registry import PORTABLE_CALLS, portable_fallback

    before = PORTABLE_CALLS[("vendor.k", "rope", "head dim 80 > 64")]
    with pytest.warns(RuntimeWarning, match="vendor.k runs rope on the portable kernel for this call: head dim 80"):
        assert portable_fallback("vendor.k", "rope", "head dim 80 > 64") is rope
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert portable_fallback("vendor.k", "rope", "head dim 80 > 64") is rope
    assert PORTABLE_CALLS[("vendor.k", "rope", "head dim 80 > 64")] == before + 2
