"""seahal.hal.streams.side_by_side: the order of its stream events, and the model's MoE through it."""

from __future__ import annotations

import contextlib

import pytest
import torch

from seahal.hal import streams
from seahal.hal.streams import SIDE_STREAM_VARIABLE, side_by_side


class _Stream:
    def __init__(self, name: str, log: list[str]):
        self.name, self.log = name, log

    def wait_stream(self, other: _Stream) -> None:
        self.log.append(f"{self.name} waits for {other.name}")


class _StreamModule:
    """The stream API of ``torch.cuda`` (and of vendor modules such as ``torch.npu``), recording
    what a caller does with it; ``current`` is the stream work is issued on."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.current = _Stream("main", self.log)

    def Stream(self, device: torch.device) -> _Stream:
        self.log.append(f"new stream on {device}")
        return _Stream("side", self.log)

    def current_stream(self, device: torch.device) -> _Stream:
        return self.current

    def current_device(self) -> int:
        return 0

    @contextlib.contextmanager
    def stream(self, stream: _Stream):
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous


@pytest.fixture
def fake_device(monkeypatch):
    """The "meta" device type with a recording :class:`_StreamModule` as its torch module."""
    module = _StreamModule()
    monkeypatch.setattr(torch, "meta", module, raising=False)
    monkeypatch.setattr(streams, "_SIDE_STREAMS", {})
    return module


def _work(module: _StreamModule, name: str, result: int):
    def run() -> int:
        module.log.append(f"{name} on {module.current.name}")
        return result
    return run


def test_the_side_branch_forks_after_and_joins_before_later_work(fake_device, monkeypatch):
    """With SEAHAL_SIDE_STREAM=1: the side stream first waits for the current one (side's inputs
    are ready), side's work goes to it, main's to the current stream, and the current stream waits
    for the side one before anything after the call; the side stream is made once per device."""
    monkeypatch.setenv(SIDE_STREAM_VARIABLE, "1")
    device = torch.device("meta")
    calls = [side_by_side(device, _work(fake_device, "main", 1), _work(fake_device, "side", 2)) for _ in range(2)]
    assert calls == [(1, 2), (1, 2)]
    once = ["side waits for main", "side on side", "main on main", "main waits for side"]
    assert fake_device.log == ["new stream on meta:0", *once, *once]
    assert fake_device.current.name == "main"


def test_without_the_variable_or_streams_the_branches_run_in_order(fake_device, monkeypatch):
    monkeypatch.delenv(SIDE_STREAM_VARIABLE, raising=False)
    assert side_by_side(torch.device("meta"), _work(fake_device, "main", 1), _work(fake_device, "side", 2)) == (1, 2)
    assert fake_device.log == ["main on main", "side on main"]
    monkeypatch.setenv(SIDE_STREAM_VARIABLE, "1")
    order = []
    assert side_by_side(torch.device("cpu"), lambda: order.append("main") or 1, lambda: order.append("side") or 2) == (1, 2)
    assert order == ["main", "side"]  # the CPU has no streams


def test_the_moe_layer_runs_its_shared_expert_beside_the_routed_ones(tmp_path, monkeypatch):
    """MoE hands side_by_side the gate with the routed experts as the main branch and the shared
    expert alone as the side one, and sums what they return (on the CPU they run in order)."""
    from seahal.model import load
    from seahal.model import moe as moe_module
    from seahal.model.tiny import write_tiny_checkpoint

    model = load(write_tiny_checkpoint(tmp_path), device="cpu", announce=False)
    layer = model.layers[1].ffn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, model.config.dim, generator=g)
    ids = torch.randint(0, model.config.vocab_size, (2, 3), generator=g)
    expected = layer(x, ids)
    branches = []

    def recording(device, main, side):
        routed, shared = main(), side()
        branches.append((device, routed, shared))
        return routed, shared

    monkeypatch.setattr(moe_module, "side_by_side", recording)
    assert torch.equal(layer(x, ids), expected)
    [(device, routed, shared)] = branches
    flat = x.reshape(6, -1)
    assert device == x.device
    assert torch.equal(shared, layer.shared_experts(flat, torch.ones(6, 1), torch.zeros(6, 1, dtype=torch.int32)))
    assert torch.equal(routed, layer.experts(flat, *layer.gate(flat, ids.reshape(-1))))
    assert torch.equal(expected, (routed + shared).to(x.dtype).view_as(x))
