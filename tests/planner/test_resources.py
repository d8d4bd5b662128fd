"""Lower bounds on a job's memory and disk (planner/resources.py): sizes read from configs, the formula, the refusal."""
import pytest
import torch
from tiny import tiny_t5
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from moeify.errors import MoeifyError
from moeify.planner import resources
from moeify.planner.resources import Depth, activation_bytes, check_memory, free_disk, state_bytes, weight_bytes


def test_depth_reads_each_familys_names():
    t5 = {"model_type": "t5", "d_model": 64, "d_ff": 256, "num_layers": 3, "num_decoder_layers": 2, "num_heads": 4,
          "vocab_size": 100, "is_encoder_decoder": True}
    gpt2 = {"model_type": "gpt2", "n_embd": 32, "n_inner": None, "n_layer": 2, "n_head": 2, "vocab_size": 50}
    llama = {"model_type": "llama", "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 5,
             "num_attention_heads": 6, "vocab_size": 70}
    assert Depth.from_config(t5) == Depth(64, 256, 3, 2, 4, 100, eager_attention=True)
    assert Depth.from_config({**t5, "num_decoder_layers": None}).decoder_layers == 3  # T5: as the encoder
    assert Depth.from_config(gpt2) == Depth(32, 128, 2, 0, 2, 50)  # n_inner None: 4 x n_embd
    assert Depth.from_config(llama) == Depth(48, 96, 5, 0, 6, 70)
    bart = {"model_type": "bart", "d_model": 64, "encoder_ffn_dim": 256, "encoder_layers": 6, "decoder_layers": 3,
            "encoder_attention_heads": 8, "vocab_size": 90, "is_encoder_decoder": True}
    assert Depth.from_config(bart) == Depth(64, 256, 6, 3, 8, 90)
    assert Depth.from_config({**llama, "_attn_implementation": "eager"}).eager_attention
    assert Depth.from_config({"hidden_size": 48}) is None  # a custom module's config: nothing to bound
    assert Depth.from_config({**llama, "vocab_size": "70"}) is None


def test_activation_bytes_counts_what_backward_must_keep():
    depth = Depth(d_model=64, d_ff=256, layers=3, decoder_layers=0, heads=4, vocab=100)
    b, s = 2, 16
    logits = b * s * 100
    assert activation_bytes(depth, b, s, 0, 4, train=True) == (3 * b * s * (4 * 64 + 256) + logits) * 4
    assert activation_bytes(depth, b, s, 0, 2, train=False) == (b * s * (64 + 256) + logits) * 2  # one layer
    t5 = Depth(d_model=64, d_ff=256, layers=3, decoder_layers=2, heads=4, vocab=100, eager_attention=True)
    encoder, decoder = b * s * 512 + b * 4 * s * s, b * 4 * 512 + b * 4 * 4 * 4
    assert activation_bytes(t5, b, s, 4, 4, train=True) == (3 * encoder + 2 * decoder + b * 4 * 100) * 4


@pytest.mark.parametrize("family", ["t5", "gpt2", "llama"])
def test_the_bound_is_below_what_autograd_really_keeps(family):
    """The refusals promise a lower bound: the tensors a real training forward saves for backward weigh more."""
    torch.manual_seed(0)
    if family == "t5":
        model = tiny_t5()
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=256))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    model.train()
    batch, seq, decoder_seq = 4, 128, 32
    inputs = {"input_ids": torch.randint(0, 32, (batch, seq))}
    inputs["labels"] = torch.randint(0, 32, (batch, decoder_seq)) if family == "t5" else inputs["input_ids"]
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = sum(n for ptr, n in storages.items() if ptr not in weights)
    bound = activation_bytes(Depth.from_config(model.config.to_dict()), batch, seq, decoder_seq, 4, train=True)
    assert 0.1 * saved < bound <= saved  # below, and not vacuously so


def test_state_bytes_counts_gradients_and_optimizer_state():
    assert state_bytes(100, train=False) == 100
    assert state_bytes(100, train=True) == 400  # weights, gradients, AdamW's two moments
    assert state_bytes(100, train=True, optimizer="adafactor") == 200


def test_weight_bytes_uses_the_summary_dtype():
    summary = {"total_params": 10, "dense_params": 4, "dtype": "bfloat16"}
    assert weight_bytes(summary) == 20 and weight_bytes(summary, "dense_params") == 8
    assert weight_bytes({**summary, "dtype": "float64"}) == 40  # unlisted: 4 bytes, still a lower bound


def test_check_memory_refuses_past_the_share_a_command_may_take(monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda: 10 * 2**30)
    check_memory(8 * 2**30, "x needs {}", "fix it")  # 80 %: allowed
    with pytest.raises(MoeifyError, match=r"^x needs 8\.1 GiB but 10\.0 GiB of memory is available: fix it$"):
        check_memory(int(8.1 * 2**30), "x needs {}", "fix it")
    with pytest.raises(MoeifyError, match=r"^y needs 2\.0 GiB but 512\.0 MiB free on gpu is available: less$"):
        check_memory(2**31, "y needs {}", "less", available=2**29, where="free on gpu")
    monkeypatch.setattr(resources, "available_memory", lambda: None)
    check_memory(10**18, "z needs {}", "never")  # no /proc/meminfo: nothing to refuse against


def test_free_disk_measures_the_nearest_existing_folder(tmp_path):
    free, where = free_disk(tmp_path / "not" / "yet" / "made")
    assert where == tmp_path and free > 0
