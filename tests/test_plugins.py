"""Third-party backends found through the ``seahal.backends`` entry points: a working plugin shows
up everywhere (backends, info, the CLI, plans); broken ones are skipped with one warning and
reported with their traceback, and never break seahal.

The plugins are real distributions: a module plus a ``<name>-0.1.dist-info`` folder with METADATA
and entry_points.txt, put on ``sys.path`` so ``importlib.metadata`` finds them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from seahal import hal
from seahal.backends.cpu.reference.rope import rope as reference_rope
from seahal.cli import main as cli
from seahal.hal import info
from seahal.hal.registry import REGISTRY
from seahal.testing.examples import example_args

GOOD_PLUGIN = '''
"""A fake vendor: a backend for the meta device with one native and one portable kernel."""
from seahal.backends.cpu.reference.mhc import hc_post as reference_hc_post
from seahal.backends.cpu.reference.rope import rope as reference_rope
from seahal.hal import Availability, register_backend, register_kernel

CALLS = []


def rope(x, positions, freqs, inverse=False):
    CALLS.append("rope")
    return reference_rope(x, positions, freqs, inverse)


def hc_post(f, x, post, comb):
    CALLS.append("hc_post")
    return reference_hc_post(f, x, post, comb)


def register():
    register_backend(
        "fakevendor",
        device_type="meta",
        probe=lambda: Availability(True, "fake accelerator x1", chip="fk1"),
        aliases=("fakedev",),
        description="test plugin",
        verified_with={"fakesdk": "1.0"},
        verified_on_hardware=False,
        priority=5,
    )
    register_kernel("rope", "fakevendor", "fast", rope, priority=10, capabilities={"dtype": ("float32",)})
    register_kernel("hc_post", "fakevendor", "anywhere", "fakevendor_plugin:hc_post", priority=50, portable=True)
'''

BROKEN_IMPORT = '''
raise ImportError("libfakedriver.so: cannot open shared object file")
'''

BROKEN_REGISTER = '''
from seahal.hal import Availability, register_backend, register_kernel


def register():
    register_backend("fakeraise", device_type="meta", probe=lambda: Availability(True))
    register_kernel("rope", "fakeraise", "half", "fakeraise_plugin:missing")
    raise RuntimeError("fake SDK version check failed")
'''

GOOD_SOURCE = "plugin fakevendor 0.1 (fakevendor_plugin:register)"


def _distribution(root, name: str, module_source: str) -> None:
    """``<root>/<name>_plugin.py`` plus ``<root>/<name>-0.1.dist-info`` declaring its entry point."""
    (root / f"{name}_plugin.py").write_text(textwrap.dedent(module_source))
    dist_info = root / f"{name}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[seahal.backends]\n{name} = {name}_plugin:register\n")


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    """Made once per module: the plugin module is imported once, so its kernels stay the same
    functions across tests (each kernel is bound as a torch op once per process)."""
    root = tmp_path_factory.mktemp("good")
    _distribution(root, "fakevendor", GOOD_PLUGIN)
    return root


@pytest.fixture(scope="module")
def broken_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    _distribution(root, "fakebroken", BROKEN_IMPORT)
    _distribution(root, "fakeraise", BROKEN_REGISTER)
    return root


@pytest.fixture
def plugin(empty_registry, good_dir, monkeypatch, reference_only):
    """The registry rediscovered with the fakevendor plugin installed; returns its module."""
    monkeypatch.syspath_prepend(str(good_dir))
    assert "fakevendor" in hal.backends()
    reference_only(empty_registry)  # plans below do not depend on native fast paths
    module = sys.modules["fakevendor_plugin"]
    module.CALLS.clear()
    return module


@pytest.fixture
def broken(empty_registry, broken_dir, monkeypatch):
    """The registry rediscovered with both broken plugins installed; returns the warnings issued."""
    monkeypatch.syspath_prepend(str(broken_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hal.backends()
        hal.backends()  # discovery runs once: no second round of warnings
        hal.plugin_failures()
    return [w for w in caught if issubclass(w.category, RuntimeWarning)]


# -- a working plugin -----------------------------------------------------------------------------


def test_plugin_backend_is_registered_with_its_source(plugin):
    backend = hal.backends()["fakevendor"]
    assert (backend.device_type, backend.aliases, backend.priority) == ("meta", ("fakedev",), 5)
    assert backend.source == GOOD_SOURCE
    assert hal.backends()["cpu"].source == "built-in"  # built-ins came through the same door
    assert hal.plugin_failures() == []
    assert hal.resolve_device("fakedev") == (torch.device("meta"), backend)


def test_rediscovery_is_idempotent(plugin):
    backend = hal.backends()["fakevendor"]
    REGISTRY._discovered = False
    assert hal.backends()["fakevendor"] is backend  # re-registering the same plugin is no conflict
    assert hal.plugin_failures() == []


def test_plugin_in_info(plugin):
    data = info.collect()
    assert data["backends"]["fakevendor"] == {
        "device_type": "meta",
        "aliases": ["fakedev"],
        "available": True,
        "reason": "fake accelerator x1",
        "chip": "fk1",
        "emulated_on": None,
        "source": GOOD_SOURCE,
        "verified_with": {"fakesdk": "1.0"},
        "verified_on_hardware": False,
        "description": "test plugin",
        "collective_backend": None,
    }
    assert data["coverage"]["rope"]["fakevendor"] == [
        {"kernel": "fast", "priority": 10, "portable": False, "device_position": False, "capabilities": {"dtype": ["float32"]}}
    ]
    assert data["coverage"]["hc_post"]["fakevendor"][0]["portable"] is True


def test_plugin_in_cli_info(plugin, capsys):
    assert cli(["info"]) == 0
    text = capsys.readouterr().out
    # names are padded to the longest backend name (onnxruntime), hence " +"
    assert re.search(r"^  fakevendor +device 'meta': available, chip fk1 \[NOT verified on hardware\]$", text, re.M)
    assert f"source: {GOOD_SOURCE}" in text
    assert "verified with: fakesdk 1.0" in text
    rope_row = next(line for line in text.splitlines() if line.strip().startswith("rope "))
    assert "fast" in rope_row.split() and "reference*" in rope_row.split()
    assert "plugin failures" not in text

    assert cli(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backends"]["fakevendor"]["source"] == GOOD_SOURCE
    assert data["plugin_failures"] == []


def test_plugin_kernels_are_chosen_for_its_device(plugin):
    with pytest.warns(RuntimeWarning, match="portable fallback: hc_head$"):
        p = hal.plan("fakedev", ops=["rope", "hc_post", "hc_head"], announce=False, environ={})
    assert p.device == torch.device("meta")
    rope = p.entries["rope"]
    assert (rope.label, rope.reason) == ("fakevendor.fast", "highest priority (10) for meta")
    assert rope.rejected == [("cpu.reference", "portable fallback, not needed on meta")]
    assert p.entries["hc_post"].label == "fakevendor.anywhere" and not p.entries["hc_post"].fallback
    assert p.entries["hc_head"].label == "cpu.reference" and p.entries["hc_head"].fallback
    assert p.summary() == (
        "plan(meta): 1 op fakevendor.fast, 1 op fakevendor.anywhere, 1 op cpu.reference [fallback: hc_head]"
    )

    # The bound op dispatches to the plugin's function (shown on cpu tensors, where it has data).
    args, _ = example_args("rope")
    assert torch.equal(p.ops.rope(*args), reference_rope(*args))
    assert plugin.CALLS == ["rope"]


def test_plugin_kernel_rejected_by_its_capabilities(plugin):
    with pytest.warns(RuntimeWarning, match="portable fallback: rope$"):
        p = hal.plan("fakevendor", ops={"rope": {"dtype": "bfloat16"}}, announce=False, environ={})
    assert p.entries["rope"].label == "cpu.reference"
    assert p.entries["rope"].rejected == [("fakevendor.fast", "dtype='bfloat16' not in ['float32']")]


def test_plugin_portable_kernel_loses_to_a_native_one(plugin):
    p = hal.plan("cpu", ops=["rope", "hc_post"], announce=False, environ={})
    assert p.summary() == "plan(cpu): 2 ops cpu.reference"
    assert p.entries["rope"].rejected == []  # a meta-only kernel is no candidate on cpu
    assert p.entries["hc_post"].rejected == [("fakevendor.anywhere", "portable fallback, not needed on cpu")]


# -- broken plugins -------------------------------------------------------------------------------


def test_broken_plugins_warn_once_each_and_are_skipped(broken):
    assert sorted(str(w.message).split(" failed")[0] for w in broken) == [
        "seahal: backend plugin fakebroken = fakebroken_plugin:register",
        "seahal: backend plugin fakeraise = fakeraise_plugin:register",
    ]
    assert all("see `seahal info` for the traceback" in str(w.message) for w in broken)
    names = hal.backends()
    assert {"cpu", "cuda", "ascend", "cambricon"} <= set(names)  # discovery carried on
    assert "fakeraise" not in names  # what it registered before raising was rolled back
    assert all(k.backend != "fakeraise" for k in REGISTRY.kernels_for("rope"))
    assert hal.plan("cpu", ops=["rope"], announce=False, environ={}).entries["rope"].label == "cpu.reference"


def test_broken_plugins_in_info_and_cli(broken, capsys):
    failures = {f["entry_point"]: f for f in info.collect()["plugin_failures"]}
    imported = failures["fakebroken = fakebroken_plugin:register"]
    assert imported["error"] == "ImportError: libfakedriver.so: cannot open shared object file"
    assert "fakebroken_plugin.py" in imported["traceback"]
    raised = failures["fakeraise = fakeraise_plugin:register"]
    assert raised["error"] == "RuntimeError: fake SDK version check failed"
    assert 'raise RuntimeError("fake SDK version check failed")' in raised["traceback"]

    assert cli(["info"]) == 0
    text = capsys.readouterr().out
    section = text.split("plugin failures (skipped):\n", 1)[1]
    assert "  fakeraise = fakeraise_plugin:register: RuntimeError: fake SDK version check failed" in section
    assert "    Traceback (most recent call last):" in section
    assert '    raise ImportError("libfakedriver.so: cannot open shared object file")' in section

    assert cli(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sorted(f["entry_point"] for f in data["plugin_failures"]) == sorted(failures)


def _seahal_info(*args: str, pythonpath: list[str] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, env.get("PYTHONPATH", "")]).strip(os.pathsep)
    return subprocess.run(
        [sys.executable, "-m", "seahal", "info", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_fresh_process_with_plugins(good_dir, broken_dir):
    """A new interpreter: import and discovery survive the broken plugins, one warning each."""
    result = _seahal_info("--json", pythonpath=[str(good_dir), str(broken_dir)])
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["backends"]["fakevendor"]["source"] == GOOD_SOURCE
    assert len(data["plugin_failures"]) == 2
    assert result.stderr.count("RuntimeWarning: seahal: backend plugin") == 2, result.stderr


def test_seahal_info_on_the_real_install():
    result = _seahal_info()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"seahal: torch {torch.__version__}, python ")
    states = {}
    for i, line in enumerate(lines):
        fields = line.split()
        if len(fields) >= 4 and fields[1] == "device" and fields[0] in ("cpu", "cuda", "ascend", "cambricon"):
            states[fields[0]] = (fields[3].rstrip(","), lines[i + 1].strip())
    assert states["cpu"][0] == "available"
    from seahal.backends.cpu.native import native_module

    native = native_module()  # the instruction-set variant its GEMMs run, or that there are none
    assert states["cpu"][1].endswith(f"native kernels: {native.simd_variant()}" if native else "native kernels not built")
    expected = {"cuda": torch.cuda.is_available(), "ascend": False, "cambricon": False}
    for name, available in expected.items():
        state, reason = states[name]
        if not available:
            assert state == "unavailable", (name, state)
            assert reason and not reason.startswith("source:"), f"{name} gives no reason"
    assert re.search(r"^  ascend +device 'npu'", result.stdout, re.M)
    assert re.search(r"^  cambricon +device 'mlu'", result.stdout, re.M)
