"""The model graph against transformers' full-sequence forward, and against itself incrementally.

Oracle: transformers' DeepseekV4ForCausalLM full forward (never its incremental decode, which is
known not to reproduce its own prefill on CSA layers). transformers simulates no quantisation, so
seahal runs with simulate_fp8_kv / simulate_fp4_indexer off for parity.
"""

from __future__ import annotations

import pytest
import torch

from seahal.model import load

from v4_checkpoints import CSA, HCA, SWA, make_hf_model, save_hf_checkpoint

# fp32 end to end: both implementations sum the same terms in different orders, so they agree to
# a few fp32 ulps per op; 2e-3 of the logit scale (the bound) leaves room for the
# top-k near-ties that fp32 rounding could flip between the two.
PARITY = 2e-3

LAYER_MIXES = {
    "swa-csa-hca-csa": [SWA, CSA, HCA, CSA],
    "csa-only": [CSA, CSA],
    "hca-swa": [HCA, SWA, HCA],
}


@pytest.fixture(scope="module", params=list(LAYER_MIXES))
def checkpoint(request, tmp_path_factory):
    hf = make_hf_model(LAYER_MIXES[request.param], n_hash_layers=1, seed=len(request.param))
    path = save_hf_checkpoint(hf, tmp_path_factory.mktemp(request.param))
    model = load(path, device="cpu", announce=False, simulate_fp8_kv=False, simulate_fp4_indexer=False)
    return hf, model


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_full_forward_matches_transformers(checkpoint):
    hf, model = checkpoint
    ids = _ids(2, 70)  # window 16 < 70; CSA sees 17 entries > index_topk 8 at the end
    with torch.no_grad():
        expected = hf(ids).logits.float()
    got = model(ids)
    assert got.shape == (2, 70, 512)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= PARITY * scale


@pytest.mark.parametrize("chunk", [1, 3, 61])
def test_prefill_then_decode_equals_full_forward(checkpoint, chunk):
    _, model = checkpoint
    ids = _ids(2, 67, seed=1)
    full = model(ids)
    cache = model.new_cache(2, 128)
    first = 5  # a prefill shorter than the CSA ratio's first block boundaries and the window
    outs = [model(ids[:, :first], cache=cache)]
    for start in range(first, ids.shape[1], chunk):
        outs.append(model(ids[:, start : start + chunk], cache=cache))
    assert cache.pos == ids.shape[1]
    incremental = torch.cat(outs, dim=1)
    assert (incremental - full).abs().max() <= PARITY * full.abs().max()
