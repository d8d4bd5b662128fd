import pytest
from tiny import tiny_net, tiny_t5
from torch import nn

import moeify
from moeify.conversion.select import select_sites, stack_key


class S:
    def __init__(self, name):
        self.name = self.region = name


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
    with pytest.raises(moeify.NoMatchError, match=r"^layers='nope' selects none of the 8 FFN sites"):
        moeify.convert(tiny_t5(), moeify.MoEConfig(layers="nope"))


class One(nn.Module):  # a model whose only FFN is at index 0
    def __init__(self):
        super().__init__()
        self.mlp = tiny_net().h[0].mlp

    def forward(self, x):
        return self.mlp(x)


def test_offset_is_the_index_of_the_first_converted_ffn():
    assert names(select_sites(T5_SITES, 2, 0, None)) == ["encoder.block.0", "encoder.block.2", "encoder.block.4",
                                                         "decoder.block.0", "decoder.block.2", "decoder.block.4"]
    assert names(select_sites(T5_SITES, 2, 4, None)) == ["encoder.block.4", "decoder.block.4"]
    assert names(select_sites(T5_SITES, 2, 5, None)) == ["encoder.block.5", "decoder.block.5"]  # not 1, 3, 5
    assert names(select_sites(T5_SITES, 1, 3, None)) == [f"{s}.block.{i}" for s in ("encoder", "decoder")
                                                         for i in (3, 4, 5)]


def test_an_offset_past_a_stack_is_refused_in_python_terms():
    with pytest.raises(moeify.NoMatchError, match=r"^offset=6 is past the last FFN of encoder.block "
                                                  r"\(6 FFNs, indices 0..5\): use an offset below 6$"):
        select_sites(T5_SITES, 2, 6, None)
    with pytest.raises(moeify.NoMatchError, match=r"^offset=1 is past the last FFN of mlp \(1 FFN, indices 0..0\)"):
        moeify.convert(One(), moeify.MoEConfig(every=2, offset=1))
    assert isinstance(moeify.convert(One(), moeify.MoEConfig(every=2, offset=0)).mlp.moe, moeify.SwitchFFN)


def test_layers_select_by_the_dense_module_names_users_see():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0))
    assert "transformer.h.0.mlp" in dict(gpt2.named_modules())
    sparse = moeify.convert(gpt2, moeify.MoEConfig(num_experts=2, layers=r"h\.0\.mlp$"))
    assert [s.name for s in sparse.moeify_record.sites] == ["transformer.h.0.mlp.moe"]
    assert sparse.moeify_record.skipped == ["transformer.h.1.mlp", "transformer.h.2.mlp"]
