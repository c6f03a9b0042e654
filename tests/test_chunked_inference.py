"""Quirk Q7 of specs/lgmvit.md: scan-wise chunked evaluation gives the whole-scan logits and maps."""

import pytest
import torch

from custom_components.data.slice_store import ScanChunkBatchSampler
from custom_components.explain import EAFEM

from conftest import tiny_vit


@pytest.mark.parametrize("faithful", [False, True])
def test_chunked_equals_whole_scan_in_eval_mode(faithful):
    model = tiny_vit(faithful=faithful)
    if faithful:  # non-trivial BatchNorm running statistics, as after training
        model.train()
        with torch.no_grad():
            model(torch.rand(8, 3, 32, 32) * 3 + 1)
    model.eval()
    scan = torch.rand(45, 3, 32, 32)
    sampler = ScanChunkBatchSampler([(0, 45)], chunk_size=16, shuffle=False)
    chunks = list(sampler)
    assert [len(c) for c in chunks] == [16, 16, 13]
    explainer = EAFEM(model, beta=0.85)
    with torch.no_grad():
        whole_logits, whole_maps = model(scan), explainer.attribute(scan)
        chunk_logits = torch.cat([model(scan[c]) for c in chunks])
        chunk_maps = torch.cat([explainer.attribute(scan[c]) for c in chunks])
    torch.testing.assert_close(chunk_logits, whole_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunk_maps, whole_maps, rtol=1e-5, atol=1e-6)
