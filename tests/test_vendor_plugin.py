"""The vendor porting kit's example (examples/vendor_plugin), installed for real with pip.

The example is built and installed by pip into a temporary folder; fresh interpreters with that
folder on PYTHONPATH then find it through its ``seahal.backends`` entry point, exactly as an
installed plugin is found: ``seahal info`` lists it, plans bind its kernels, the tiny model runs
on ``device="examplechip"``, and ``seahal conformance --backend examplechip`` passes.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vendor_plugin"
SOURCE = "plugin seahal-examplechip 0.1.0 (seahal_examplechip:register)"
OWN_KERNELS = ("rope", "fp8_act_quant")
OFFLINE_SETUPTOOLS = (70, 1)
"""setuptools builds wheels by itself from 70.1 on (bdist_wheel moved in from the wheel package).
torch 2.13 requires setuptools>=77, so every environment seahal installs into has it."""


def _offline_build_possible() -> bool:
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    major, minor = (int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups())
    return (major, minor) >= OFFLINE_SETUPTOOLS


def _run(args: list[str], site: Path, env: dict[str, str] | None = None, timeout: int = 180):
    environ = dict(os.environ, **(env or {}))
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), environ.get("PYTHONPATH", "")]))
    environ.pop("SEAHAL_BACKEND", None)
    environ.pop("SEAHAL_OPS", None)
    command = [sys.executable, *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, env=environ, timeout=timeout)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The example installed by pip into a fresh folder (``--target``), from a copy of its source
    so the in-tree build leaves nothing behind in the repository.

    With a recent setuptools in this environment (torch depends on one) the build runs offline
    with ``--no-build-isolation``; otherwise pip builds in an isolated environment and fetches
    the pyproject's build requirements from the index.
    """
    root = tmp_path_factory.mktemp("examplechip")
    source = root / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = root / "site"
    isolation = ["--no-build-isolation"] if _offline_build_possible() else []
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *isolation, "--target", str(target)]
    result = subprocess.run([*pip, str(source)], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (target / "seahal_examplechip" / "kernels.py").exists()
    return target


def test_seahal_info_lists_the_plugin(site):
    result = _run(["-m", "seahal", "info"], site)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:2] == ["examplechip", "device"])
    assert lines[at].split(None, 1)[1] == "device 'cpu': available, chip ex1"
    assert re.fullmatch(r"examplechip simulator on \d+ CPU threads?", lines[at + 1].strip())
    assert lines[at + 2].strip() == f"source: {SOURCE}"
    assert lines[at + 3].strip() == "verified with: seahal 0.1.0, torch 2.13.0"
    assert "plugin failures" not in result.stdout and "RuntimeWarning" not in result.stderr
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["op"])
    column = lines[header].split().index("examplechip")
    rows = {line.split()[0]: line.split() for line in lines[header + 1 :] if line.startswith("  ") and "(" not in line}
    assert {op for op, row in rows.items() if row[column] == "vector"} == set(OWN_KERNELS)


PLANS_AND_MODEL = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import seahal_examplechip
    from seahal import hal
    from seahal.model import load
    from seahal.model.tiny import default_checkpoint

    def plan(device, ops=None, **env):
        return hal.plan(device, ops=ops, announce=False, environ=env).to_dict()

    def logits(device):
        # no FP4 indexer simulation: the indexer's query then takes examplechip's rope (with it, the
        # release's, that RoPE runs inside hadamard_rotate)
        model = load(path, device=device, announce=False, environ={}, simulate_fp4_indexer=False)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = model(ids)
        ran = sorted({e.name for e in prof.events() if e.name.startswith("seahal::")})
        return out, model.plan.to_dict(), ran

    path, _ = default_checkpoint()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    on_chip, chip_plan, chip_ran = logits("examplechip")
    on_cpu, cpu_plan, cpu_ran = logits("cpu")
    os.environ[seahal_examplechip.DISABLE_VARIABLE] = "1"
    disabled = seahal_examplechip.probe()
    others = [  # backends device="auto" could rank above examplechip (priority 10)
        b.name for b in hal.backends().values()
        if b.availability() and b.priority >= 10 and b.name not in ("cpu", "examplechip")
    ]
    json.dump({
        "examplechip": plan("examplechip"),
        "alias_strict": hal.plan("exchip", announce=False, environ={}, policy="strict").to_dict(),
        "cpu": plan("cpu"),
        "auto": hal.resolve_device("auto")[1].name,
        "other_available": others,
        "requirements": plan("examplechip", {"rope": {"dtype": "float64"}, "fp8_act_quant": {"scale_fmt": "fp32"}}),
        "override": plan("examplechip", ["rope", "fp8_act_quant"], SEAHAL_OPS="rope=cpu"),
        "model": {"examplechip": chip_plan, "cpu": cpu_plan},
        "ran": {"examplechip": chip_ran, "cpu": cpu_ran},
        "logits_equal": torch.equal(on_chip, on_cpu),
        "logits_max_abs_diff": (on_chip - on_cpu).abs().max().item(),
        "disabled": [disabled.ok, disabled.reason],
    }, sys.stdout)
    """
)


@pytest.fixture(scope="module")
def outcome(site, tmp_path_factory):
    """Plans and the tiny model (built into a temporary SEAHAL_CACHE) in one fresh interpreter."""
    cache = tmp_path_factory.mktemp("cache")
    result = _run(["-c", PLANS_AND_MODEL], site, env={"SEAHAL_CACHE": str(cache), "SEAHAL_QUIET": "1"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _labels(plan: dict) -> dict[str, str]:
    return {op: entry["kernel"] for op, entry in plan["ops"].items()}


def test_examplechip_plan_binds_its_kernels_and_cpu_for_the_rest(outcome):
    for name in ("examplechip", "alias_strict"):  # the alias resolves alike; strict: nothing falls back
        plan = outcome[name]
        assert (plan["backend"], plan["device"]) == ("examplechip", "cpu")
        labels = _labels(plan)
        for op in OWN_KERNELS:
            assert labels[op] == "examplechip.vector"
            assert plan["ops"][op]["reason"] == "highest priority (20) for cpu"
        assert all(labels[op].startswith("cpu.") for op in labels if op not in OWN_KERNELS)
        assert not any(entry["fallback"] for entry in plan["ops"].values())


def test_cpu_plan_is_unchanged_and_says_why(outcome):
    """Kernels compete per device type: the example's ``supports`` predicate keeps its kernels out
    of plans for device="cpu" (chip None) and says so in the plan."""
    plan = outcome["cpu"]
    assert plan["backend"] == "cpu"
    assert set(_labels(plan).values()) <= {"cpu.reference", "cpu.native"}
    for op in OWN_KERNELS:
        assert {"kernel": "examplechip.vector", "reason": "serves examplechip plans only (this plan's chip: None)"} in (
            plan["ops"][op]["rejected"]
        )


def test_auto_prefers_examplechip_to_cpu(outcome):
    if outcome["other_available"]:
        pytest.skip(f"an accelerator backend is available here: {outcome['other_available']}")
    assert outcome["auto"] == "examplechip"


def test_capabilities_and_overrides_send_ops_back_to_cpu(outcome):
    rope, quant = outcome["requirements"]["ops"]["rope"], outcome["requirements"]["ops"]["fp8_act_quant"]
    assert rope["kernel"] == quant["kernel"] == "cpu.reference"
    rope_why = "dtype='float64' not in ['bfloat16', 'float32']"
    assert {"kernel": "examplechip.vector", "reason": rope_why} in rope["rejected"]
    assert {"kernel": "examplechip.vector", "reason": "scale_fmt='fp32' not in ['ue8m0']"} in quant["rejected"]
    override = outcome["override"]["ops"]
    assert (override["rope"]["kernel"], override["rope"]["reason"]) == ("cpu.reference", "override cpu")
    assert override["fp8_act_quant"]["kernel"] == "examplechip.vector"


def test_probe_explains_unavailability(outcome):
    assert outcome["disabled"] == [False, "disabled by EXAMPLECHIP_DISABLE=1"]


def test_tiny_model_on_examplechip_matches_cpu(outcome):
    """Tolerance: none, the logits must be bitwise equal. examplechip's rope performs the same fp32
    operations per element as the reference, and fp8_act_quant's contract fixes every rounding (the
    conformance suite holds it to bitwise equality), so the two plans compute identical numbers; any
    difference is a bug in the example, not rounding."""
    chip_ops = _labels(outcome["model"]["examplechip"])
    assert all(chip_ops[op] == "examplechip.vector" for op in OWN_KERNELS)
    assert set(_labels(outcome["model"]["cpu"]).values()) <= {"cpu.reference", "cpu.native"}
    for op in OWN_KERNELS:  # the forward really went through examplechip's kernels (and cpu's did not)
        assert f"seahal::{op}__examplechip_vector" in outcome["ran"]["examplechip"]
        assert f"seahal::{op}__cpu_reference" in outcome["ran"]["cpu"]
        assert f"seahal::{op}__cpu_reference" not in outcome["ran"]["examplechip"]
    assert outcome["logits_equal"], f"max |difference| {outcome['logits_max_abs_diff']}"


def test_conformance_passes(site, tmp_path):
    report_path = tmp_path / "report.json"
    result = _run(["-m", "seahal", "conformance", "--backend", "examplechip", "--json", str(report_path)], site)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["device"] == "cpu"
    for op in OWN_KERNELS:
        ran = [r for r in report["results"] if r["op"] == op and r["kernel"] == "examplechip.vector"]
        assert sum(r["status"] == "pass" for r in ran) >= 5, op
    unsupported = {r["detail"] for r in report["results"] if r["status"] == "unsupported"}
    others = {f"backend examplechip registers no kernel for {op}" for op in report["counts"] if op not in OWN_KERNELS}
    assert unsupported == others | {"capabilities: scale_fmt='fp32' not in ['ue8m0']"}
    assert re.search(r"^total: \d+ passed, 0 failed, \d+ unsupported$", result.stdout, re.MULTILINE)
