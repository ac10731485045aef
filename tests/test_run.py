"""``seahal run`` in-process: builds and caches the tiny checkpoint, prints the plan, the
generation figures and, with --compare-reference, the logit difference to the CPU reference."""

from __future__ import annotations

import json
import re

import pytest
import torch

from seahal.cli import main


def _seahal(*argv: str) -> int:
    return main(list(argv))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEAHAL_CACHE", str(tmp_path))
    return tmp_path / "default-v4-tiny"


def test_run_builds_then_reuses_the_default_checkpoint(cache, capsys):
    assert _seahal("run", "--device", "cpu", "--max-new-tokens", "2", "--warmup", "0") == 0
    first = capsys.readouterr().out
    assert re.search(r"checkpoint: built-in tiny DeepSeek-V4 at .*default-v4-tiny \(built in [\d.]+ s\)", first)
    assert re.search(r"^fp4_gemm +cpu\.", first, re.M)  # the plan table
    assert "prompt: 16 tokens [0, 100, 101" in first
    assert re.search(r"generated: [12] tokens \[", first)
    assert re.search(r"prefill: 16 tokens in [\d.]+ s = [\d.]+ tok/s", first)
    assert re.search(r"decode: [01] tokens in [\d.]+ s = [\d.]+ tok/s \(eager\)", first)  # no CUDA graph on the CPU
    assert re.search(r"cache: \d+ bytes/token", first)
    shards = {p: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    assert shards

    assert _seahal("run", "--device", "cpu", "--max-new-tokens", "2", "--warmup", "1", "--compare-reference") == 0
    second = capsys.readouterr().out
    assert "default-v4-tiny (cached)" in second
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")} == shards
    assert second.split("generated:")[1].split("\n")[0] == first.split("generated:")[1].split("\n")[0]
    match = re.search(r"max \|logit diff\| (\S+) over \d+ positions .*relative RMS diff (\S+)\)", second)
    assert match, second
    # On this CPU plan every op is the reference itself: difference 0. A native CPU kernel summing in
    # another order may flip an FP8 activation rounding (2^-4 on one element of a >= 128-element
    # row, <= 2^-4/sqrt(128) ~ 0.006 RMS per op), which this random model amplifies ~2x per op
    # chain (see test_convert): 5% relative RMS at the logits is generous, unrelated logits give ~1.4.
    assert float(match[2]) <= 0.05
    assert re.search(r"reference greedy picks agree with the generated tokens at [12]/[12] positions", second)


def test_run_with_a_model_path_encodes_a_text_prompt_with_its_tokenizer(cache, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from seahal.model.tiny import default_checkpoint
    from seahal.model.tokenizer import load_tokenizer

    words = ["hello", "tiny", "world", "[UNK]"]
    tokenizer = Tokenizer(models.WordLevel({w: 100 + i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    folder, _ = default_checkpoint()
    model = tmp_path / "with-tokenizer"
    model.mkdir()
    for f in folder.iterdir():
        (model / f.name).symlink_to(f)
    tokenizer.save(str(model / "tokenizer.json"))
    assert load_tokenizer(folder) is None
    assert load_tokenizer(model).encode("hello tiny world") == [100, 101, 102]

    capsys.readouterr()
    argv = ["run", "--model", str(model), "--device", "cpu", "--prompt", "hello world", "--max-new-tokens", "1",
            "--warmup", "0"]
    assert _seahal(*argv) == 0
    out = capsys.readouterr().out
    assert "checkpoint: built-in" not in out
    assert "prompt: 2 tokens [100, 102]" in out
    assert re.search(r"^text: 'hello world", out, re.M)


def test_convert_command_writes_bounded_shards_with_the_chosen_formats(tmp_path, capsys):
    from seahal.model.checkpoint import iter_tensors
    from seahal.model.tiny import write_tiny_checkpoint

    src = write_tiny_checkpoint(tmp_path / "dense", quantise=False)
    dst = tmp_path / "converted"
    argv = ["convert", "--src", str(src), "--dst", str(dst), "--linears", "bf16", "--max-shard-gb", "0.001"]
    assert _seahal(*argv) == 0
    assert f"wrote {dst} (experts fp4, linears bf16)" in capsys.readouterr().out
    tensors = {name: t for name, _, t in iter_tensors(dst, torch.device("cpu"))}
    assert len(list(dst.glob("*.safetensors"))) > 1  # shards of about 1 MB
    assert tensors["layers.1.attn.wq_a.weight"].dtype == torch.bfloat16
    assert "layers.1.attn.wq_a.scale" not in tensors
    assert tensors["layers.1.ffn.experts.0.w1.weight"].dtype == torch.uint8
    config = json.loads((dst / "config.json").read_text())
    assert config["expert_dtype"] == "fp4" and "quantization_config" not in config


def test_a_load_imports_no_torch_dynamo(cache):
    """The meta build of a checkpoint's model makes nothing it needs torch's Python decompositions
    for: their first use imports torch._dynamo, 2 s of a 4 s ``seahal run`` (the embedding's
    ``normal_`` and the RoPE table, both on meta tensors, did)."""
    import subprocess
    import sys

    script = ("import sys; from seahal.cli import main; main(['run', '--device', 'cpu', '--max-new-tokens', '1', "
              "'--warmup', '0']); print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.splitlines()[-1] == "False", done.stdout[-2000:]
