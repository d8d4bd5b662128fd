import pytest
import torch

from moeify.layers.router import Router


def test_router_runs_in_float32_for_bfloat16_inputs():
    r = Router(8, 4)
    r.reset_parameters(1.0, torch.Generator().manual_seed(0))
    x = torch.randn(5, 8).to(torch.bfloat16)
    out = r(x)
    assert out.logits.dtype == torch.float32 and out.probs.dtype == torch.float32
    ref = x.float() @ r.weight.t()
    torch.testing.assert_close(out.logits, ref)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(5))
    assert torch.equal(out.expert_index, ref.argmax(-1, keepdim=True))
    torch.testing.assert_close(out.gate, torch.softmax(ref, -1).max(-1, keepdim=True).values)


def test_jitter_only_in_training():
    r = Router(8, 4, jitter=0.5)
    r.reset_parameters(1.0, torch.Generator().manual_seed(0))
    x = torch.randn(64, 8)
    r.eval()
    assert torch.equal(r(x).logits, r(x).logits)
    r.train()
    assert not torch.equal(r(x).logits, r(x).logits)


def test_paper_init_scale():
    r = Router(512, 64)
    r.reset_parameters(0.1, torch.Generator().manual_seed(0))
    std = (0.1 / 512) ** 0.5
    assert r.weight.abs().max() <= 2 * std + 1e-7  # truncated at two standard deviations
    # a normal truncated at 2 std has std ~0.88 of the untruncated one
    assert r.weight.std().item() == pytest.approx(0.88 * std, rel=0.05)
