"""Initialisation is device-independent: one seed, the same weights on cpu and cuda, the same shapes on meta."""
import pytest
import torch
from tiny import tiny_t5

import moeify

CONFIGS = [dict(init="random"), dict(init="upcycle", upcycle_noise=0.1), dict(init="moefy"),
           dict(router_init="hidden")]
# Clustered on the CPU from the dense weights: moefy's experts and routers do not depend on the device.
# Not hidden: its routers come from hidden states, which a CUDA forward rounds differently.
DEVICE_FREE = CONFIGS[:3]


def state(model):
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("options", CONFIGS)
def test_meta_conversion_has_the_cpu_shapes_and_dtypes(options):
    config = moeify.MoEConfig(num_experts=4, seed=3, **options)
    cpu = state(moeify.convert(tiny_t5(), config))
    meta = moeify.convert(tiny_t5().to("meta"), config).state_dict()
    assert {k: (v.shape, v.dtype) for k, v in meta.items()} == {k: (v.shape, v.dtype) for k, v in cpu.items()}
    assert all(v.is_meta for v in meta.values())


@pytest.mark.parametrize("options", CONFIGS)
def test_a_seed_gives_the_same_weights_twice_and_another_seed_does_not(options):
    a = state(moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=4, seed=3, **options)))
    b = state(moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=4, seed=3, **options)))
    c = state(moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=4, seed=4, **options)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    routers = [k for k in a if k.endswith("router.weight")]
    assert routers and not any(torch.equal(a[k], c[k]) for k in routers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("options", DEVICE_FREE)
def test_cuda_conversion_gives_the_cpu_weights(options):
    config = moeify.MoEConfig(num_experts=4, seed=3, **options)
    cpu = state(moeify.convert(tiny_t5(), config))
    cuda = moeify.convert(tiny_t5().to("cuda"), config)
    assert all(p.device.type == "cuda" for p in cuda.parameters())
    got = state(cuda)
    assert all(torch.equal(got[k], cpu[k]) for k in cpu)
