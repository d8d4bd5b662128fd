import math

import pytest
import torch

from moeify.layers.router import Router, truncated_normal_
from moeify.layers.router import softmax as router_softmax


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



@pytest.mark.parametrize("tokens, experts", [(600, 1), (300, 2), (300, 8), (300, 15), (300, 16), (300, 64),
                                             (64, 1), (64, 4), (64, 8)])
def test_the_routers_softmax_takes_the_transposed_view_below_a_vector_of_experts(tokens, experts):
    """Below 16 experts and from 512 logits the softmax runs over the transposed logits' first dimension (torch's
    last-dimension softmax is a scalar loop there): within an ulp of torch's last-dimension softmax, values and
    gradients; from 16 experts, or with fewer logits, it is that softmax, bit for bit."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(tokens, experts, generator=g) * 4).requires_grad_()
    grad = torch.randn(tokens, experts, generator=g)
    probs = router_softmax(logits)
    want = torch.softmax(logits, -1)
    narrow = torch.softmax(logits.t(), 0).t()
    transposed = experts < 16 and tokens * experts >= 512
    assert torch.equal(probs, narrow if transposed else want) and probs.shape == (tokens, experts)
    torch.testing.assert_close(probs, want, rtol=2e-7, atol=2e-7)
    got, need = (torch.autograd.grad(p, logits, grad)[0] for p in (probs, want))
    torch.testing.assert_close(got, need, rtol=1e-6, atol=1e-6)
    assert torch.equal(got, need) or transposed


def test_truncated_normal_has_the_truncated_distribution_and_one_draw_for_every_layout():
    std, n = 0.02, 1 << 20
    t = truncated_normal_(torch.empty(n), std, torch.Generator().manual_seed(0))
    z = math.erf(2 / math.sqrt(2))  # mass of N(0, 1) within 2 std
    expected_std = std * math.sqrt(1 - 2 * 2 * math.exp(-2) / math.sqrt(2 * math.pi) / z)
    assert t.abs().max() <= 2 * std
    assert t.std().item() == pytest.approx(expected_std, rel=0.005)
    assert t.mean().item() == pytest.approx(0.0, abs=5 * std / math.sqrt(n))
    inside_one_std = (t.abs() <= std).double().mean().item()
    assert inside_one_std == pytest.approx(math.erf(1 / math.sqrt(2)) / z, abs=0.002)
    # bfloat16 and a transposed view get the float32 draw of the same seed (rounded), not another one
    bf16 = truncated_normal_(torch.empty(n, dtype=torch.bfloat16), std, torch.Generator().manual_seed(0))
    assert torch.equal(bf16, t.to(torch.bfloat16))
    view = torch.empty(1 << 10, 1 << 10).t()
    truncated_normal_(view, std, torch.Generator().manual_seed(0))
    assert torch.equal(view, t.view(1 << 10, 1 << 10))
    assert truncated_normal_(torch.empty(4, device="meta"), std).is_meta

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
