import pytest
from tiny import tiny_net, tiny_t5
from torch import nn

import moeify
from moeify.conversion.select import select_sites, stack_key


class S:
    def __init__(self, name):
        self.name = name


T5_SITES = [S(f"encoder.block.{i}.layer.1.DenseReluDense") for i in range(6)] + \
           [S(f"decoder.block.{i}.layer.2.DenseReluDense") for i in range(6)]


def names(sites):
    return [s.name.split(".layer")[0] for s in sites]


def test_stack_key_uses_the_first_list_index():
    assert stack_key("encoder.block.3.layer.1.DenseReluDense") == ("encoder.block", 3)
    assert stack_key("mlp") == ("mlp", 0)


def test_default_every_other_layer_per_stack():
    chosen = select_sites(T5_SITES, every=2, offset=1, layers=None)
    assert names(chosen) == ["encoder.block.1", "encoder.block.3", "encoder.block.5",
                             "decoder.block.1", "decoder.block.3", "decoder.block.5"]


def test_every_one_and_offsets():
    assert len(select_sites(T5_SITES, 1, 0, None)) == 12
    assert names(select_sites(T5_SITES, 3, 0, None)) == ["encoder.block.0", "encoder.block.3",
                                                         "decoder.block.0", "decoder.block.3"]


def test_regex_overrides_every():
    chosen = select_sites(T5_SITES, 2, 1, r"^decoder\.block\.[04]\.")
    assert names(chosen) == ["decoder.block.0", "decoder.block.4"]


def test_regex_selecting_nothing_is_an_error():
    with pytest.raises(moeify.NoMatchError, match=r"--layers 'nope' selects none of the 8 FFN sites"):
        moeify.convert(tiny_t5(), moeify.MoEConfig(layers="nope"))


def test_every_selecting_nothing_names_the_fix():
    class One(nn.Module):  # a model whose only FFN is at index 0
        def __init__(self):
            super().__init__()
            self.mlp = tiny_net().h[0].mlp

        def forward(self, x):
            return self.mlp(x)

    with pytest.raises(moeify.NoMatchError, match="use --every 1"):
        moeify.convert(One(), moeify.MoEConfig(every=2, offset=1))
