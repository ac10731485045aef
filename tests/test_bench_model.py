"""``seahal bench --backend cuda --ops model --device cpu --quick``: the end-to-end rows at the tiny scale.

The same code as the GPU run (seahal/bench/model_e2e.py): one random checkpoint that seahal and
transformers both load, seahal's bf16 and release layouts checked against transformers' fp32 full
forward, then timed beside transformers' bf16 eager model; rows in the bench schema and JSON.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from seahal.bench import model_e2e, run_cuda
from seahal.model.config import ModelConfig
from seahal.model.tiny import TINY_CONFIG

from hf_v4 import transformers_v4

pytest.importorskip("transformers")

CPU = torch.device("cpu")
SCALE = model_e2e.scale(CPU, quick=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return model_e2e.write_checkpoints(tmp_path_factory.mktemp("model"), SCALE, CPU)


def test_cpu_quick_rows_agree_with_transformers_and_carry_both_timings(tmp_path):
    transformers_v4()  # its model is the oracle and the peer
    path = tmp_path / "bench.json"
    rows = run_cuda(["model"], "cpu", quick=True, json_path=str(path))
    assert [(r["shape"], r["kernel"]) for r in rows] == [
        (shape, f"seahal {layout}") for layout in ("fp8+fp4", "bf16")
        for shape in ("prefill 128", "decode @128", "prefill 256", "decode @256")
    ]
    for r in rows:
        assert "note" not in r, r["note"]
        assert r["op"] == "model" and r["batch"] == 1
        assert r["tokens"] == (r["context"] if r["shape"].startswith("prefill") else 1)
        check = r["check"]
        assert check["passed"] and check["err"] <= check["tolerance"] and check["prompts"] == SCALE.check_prompts
        tolerance = model_e2e.DENSE_TOLERANCE if r["layout"] == "bf16" else model_e2e.RELEASE_TOLERANCE
        assert check["tolerance"] == tolerance
        assert r["us"] > 0 and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["us"] * 1e6)
        peer = r["peer"]["transformers"]
        assert peer["us"] > 0 and r["speedup"] == pytest.approx(peer["us"] / r["us"])
        assert peer["dtype"] == "bf16" and peer["attention"] == "eager" and 0 < peer["err"] < model_e2e.DENSE_TOLERANCE
        assert r["timing"] == {"seahal": "host", "transformers": "host"}
        assert r["flops"] > 0 and r["bytes"] > 0 and r["plan"]["backend"] == "cpu"
        assert "goal_us" not in r  # the goals are GPU figures
    # The bf16 weights agree with the fp32 oracle to bf16 rounding (measured ~0.005); the release
    # layout's FP8/FP4 weights move the logits further (measured ~0.1): it did load quantised.
    errors = {(r["layout"], r["context"]): r["check"]["err"] for r in rows}
    assert all(errors["bf16", ctx] < errors["fp8+fp4", ctx] / 4 for ctx in SCALE.contexts)
    document = json.loads(path.read_text())
    assert document["rows"] == json.loads(json.dumps(rows))


def _negate(folder, name: str) -> None:
    """Flip the sign of checkpoint tensor ``name`` in place."""
    for file in folder.glob("*.safetensors"):
        tensors = load_file(file)
        if name in tensors:
            tensors[name] = -tensors[name]
            save_file(tensors, file, metadata={"format": "pt"})
            return
    raise KeyError(name)


def test_an_oracle_with_one_weight_changed_fails_every_check_and_nothing_of_seahal_is_timed(checkpoints, tmp_path):
    transformers_v4()  # its model is the oracle and the peer
    dense, release = checkpoints
    perturbed = shutil.copytree(dense, tmp_path / "perturbed")
    # One sublayer's output projection negated: the logits move by ~0.4 on every prompt.
    _negate(perturbed, "layers.1.attn.wo_b.weight")
    rows = model_e2e.measure(dense, release, dataclasses.replace(SCALE, contexts=(128,)), CPU, oracle_folder=perturbed)
    assert len(rows) == 4
    for r in rows:
        assert not r["check"]["passed"] and r["check"]["err"] > model_e2e.RELEASE_TOLERANCE
        assert r["us"] is None and r["note"] == "wrong result: not timed"
        assert r["peer"]["transformers"]["us"] > 0  # the peer's speed does not depend on the oracle


@pytest.mark.parametrize("raw", [TINY_CONFIG, model_e2e.V4_FLASH_4_LAYERS], ids=["tiny", "v4-flash-4-layers"])
def test_the_transformers_config_reads_back_as_the_same_architecture_in_both_libraries(raw):
    from transformers import DeepseekV4Config

    config = ModelConfig.from_dict(raw)
    hf = config.to_hf_dict()
    assert ModelConfig.from_dict(hf) == config
    theirs = DeepseekV4Config(**{k: v for k, v in hf.items() if k != "model_type"})
    assert ModelConfig.from_dict(theirs.to_dict()) == config


def test_a_config_transformers_cannot_express_is_refused():
    with pytest.raises(ValueError, match=r"one HCA ratio .* got HCA ratios \[16, 128\]"):
        ModelConfig.from_dict({**TINY_CONFIG, "compress_ratios": [0, 4, 16, 128]}).to_hf_dict()


def test_the_prompt_as_one_graph_step_is_timed_only_when_it_gives_the_eager_logits(checkpoints):
    """The E2E prefill row's captured-step peer (captured on a GPU; on the CPU the same step runs
    eagerly): timed, with its error against the eager prefill (bit for bit here, as the generic
    step is), on a cache that restarts at 0 for each call; against logits that are not the
    prompt's (another prompt's), refused."""
    dense, _ = checkpoints
    model = model_e2e._Seahal(dense, CPU, capacity=64)
    ids = torch.randint(0, model.model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    eager = [model.prefill(ids[p : p + 1])[0].float() for p in range(2)]
    timed = model_e2e._graph_prefill(model, ids[:1], eager[0], SCALE, CPU)
    assert timed["graph_prefill_err"] == 0 and timed["graph_prefill_us"] > 0
    assert model.prompt_graph.positions == [40]  # one cache, restarted for every call
    refused = model_e2e._graph_prefill(model, ids[:1], eager[1], SCALE, CPU)
    assert refused == {"graph_prefill_error": refused["graph_prefill_error"]}
    assert refused["graph_prefill_error"].endswith("off the eager prefill's: not timed")


def test_a_decode_row_carries_each_opt_in_as_a_peer(tmp_path):
    """The decode graph captured again per opt-in (:data:`model_e2e.OPT_IN_DECODES`): each one
    timed is a peer of the row, each that failed to capture says why; PDL only on the cuda plan."""
    transformers_v4()  # its model is the oracle and the peer
    from seahal.hal.streams import SIDE_STREAM_VARIABLE
    from seahal.model import load
    from seahal.model.tiny import write_tiny_checkpoint

    model = load(write_tiny_checkpoint(tmp_path), device="cpu", announce=False)
    pdl = model_e2e.PDL_VARIABLE
    assert {key: variables for key, (variables, _) in model_e2e.OPT_IN_DECODES.items()} == {
        "pdl": (pdl,), "side_stream": (SIDE_STREAM_VARIABLE,), "pdl_side_stream": (pdl, SIDE_STREAM_VARIABLE)}
    if importlib.util.find_spec("triton") is not None:
        from seahal.backends.cuda._pdl import PDL_VARIABLE

        assert pdl == PDL_VARIABLE
    assert model_e2e._opt_ins(type("Wrapped", (), {"model": model})()) == ["side_stream"]  # no PDL off the cuda plan
    cuda_plan = type("Plan", (), {"backend": type("Backend", (), {"name": "cuda"})()})()
    on_cuda = type("Wrapped", (), {"model": type("Model", (), {"plan": cuda_plan})()})()
    assert model_e2e._opt_ins(on_cuda) == ["pdl", "side_stream", "pdl_side_stream"]
    ours = model_e2e._Measured(torch.zeros(1, 8), 1000.0, 100.0, {"side_stream_decode_us": 80.0, "pdl_error": "boom",
                                                                   "pdl_side_stream_decode_us": 70.0})
    row = model_e2e._row("decode", 16, "bf16", model, ours, None, None)
    assert row["peer"]["seahal graph, shared expert on a side stream"]["us"] == 80.0
    assert row["peer"]["seahal graph, PDL launches and a side stream"]["us"] == 70.0
    assert "seahal graph, PDL launches" not in row["peer"] and row["pdl_error"] == "boom"
    assert model_e2e._row("prefill", 16, "bf16", model, ours, None, None)["peer"] == {}


def test_an_opt_in_sets_its_variables_for_its_capture_only(monkeypatch):
    """``pdl_side_stream`` captures its graph with both variables set; each is then restored (unset,
    or the value it had), and the model's graph is dropped so the next capture starts afresh."""
    from seahal.hal.streams import SIDE_STREAM_VARIABLE

    pdl = model_e2e.PDL_VARIABLE
    monkeypatch.delenv(pdl, raising=False)
    monkeypatch.setenv(SIDE_STREAM_VARIABLE, "0")
    seen = {}

    def decode_us(decode, model, prompt, steps, s, device):
        seen.update({v: model_e2e.os.environ.get(v) for v in (pdl, SIDE_STREAM_VARIABLE)}, graph=model.graph)
        return 5.0

    monkeypatch.setattr(model_e2e, "_decode_us", decode_us)
    model = type("Model", (), {"graph": "old", "decode": None})()
    assert model_e2e._opted_in_decode_us("pdl_side_stream", model, None, [], SCALE, CPU) == 5.0
    assert seen == {pdl: "1", SIDE_STREAM_VARIABLE: "1", "graph": None}
    assert pdl not in model_e2e.os.environ and model_e2e.os.environ[SIDE_STREAM_VARIABLE] == "0"
    assert model.graph is None


def test_a_combination_is_not_captured_when_a_part_failed_alone():
    """PDL and the side stream together are captured only when each was captured alone: a capture
    that failed once is not tried again inside a larger one (a failed capture can leave state behind)."""
    details = {"pdl_error": "RuntimeError: capture refused"}
    assert model_e2e._failed_part("pdl_side_stream", details) == "pdl"
    assert model_e2e._failed_part("pdl_side_stream", {"side_stream_decode_us": 1.0}) is None
    assert model_e2e._failed_part("side_stream", details) is None  # not a part of the side stream alone
