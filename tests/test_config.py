"""One source of truth for configuration: every routing value reaches the layers, and survives save/load."""
import dataclasses

import pytest
import torch
from click.testing import CliRunner
from tiny import tiny_t5

import moeify
from moeify.cli import main
from moeify.config import MoEConfig, RoutingConfig

# A non-default value for every RoutingConfig field (num_experts included).
ODD = dict(num_experts=3, top_k=2, normalize_gates=True, dropless=True, capacity_factor=1.7, eval_capacity_factor=3.5,
           min_capacity=7, aux_loss_coef=0.03, z_loss_coef=0.004, jitter=0.05, router_dtype="float64",
           kernel="reference")


def test_odd_values_cover_every_routing_field_and_differ_from_the_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(RoutingConfig)}
    assert set(ODD) == set(fields)
    assert all(ODD[k] != v for k, v in fields.items())


def check_layers(model):
    layers = [m for m in model.modules() if isinstance(m, moeify.SwitchFFN)]
    assert layers
    for layer in layers:
        assert dataclasses.asdict(layer.routing) == ODD
        assert layer.num_experts == 3 and layer.experts.num_experts == 3
        assert layer.router.jitter == 0.05 and layer.router.weight.dtype == torch.float64
        assert (layer.router.top_k, layer.router.normalize) == (2, True)
        assert layer.capacity(10) is None  # dropless
        capped = dataclasses.replace(layer.routing, dropless=False)
        assert capped.capacity(10, training=True) == 12  # max(7, ceil(1.7 * 2 * 10 / 3) = 12)
        assert capped.capacity(2, training=True) == 7  # max(7, ceil(1.7 * 2 * 2 / 3) = 3)
        assert capped.capacity(10, training=False) == 24  # ceil(3.5 * 2 * 10 / 3)


def test_every_routing_value_reaches_the_layers_and_survives_save_and_load(tmp_path):
    sparse = moeify.convert(tiny_t5(), MoEConfig(**ODD))
    check_layers(sparse)
    moeify.save(sparse, tmp_path / "odd")
    again = moeify.load(tmp_path / "odd")
    check_layers(again)
    assert again.moeify_record.config == MoEConfig(**ODD)


def test_router_losses_use_the_layer_coefficients():
    sparse = moeify.convert(tiny_t5(), MoEConfig(**ODD)).eval()
    with moeify.router_losses(sparse) as losses:
        sparse(input_ids=torch.randint(2, 64, (2, 7)), decoder_input_ids=torch.randint(2, 64, (2, 5)))
    expected = sum(0.03 * r.aux_loss + 0.004 * r.z_loss for r in losses.layers)
    assert all((r.aux_loss_coef, r.z_loss_coef) == (0.03, 0.004) for r in losses.layers)
    torch.testing.assert_close(losses.total(), expected)


def test_moe_config_takes_its_routing_defaults_from_routing_config():
    moe, routing = MoEConfig(), RoutingConfig()
    assert moe.routing == routing
    for f in dataclasses.fields(RoutingConfig):
        assert MoEConfig.__dataclass_fields__[f.name].metadata["help"] == f.metadata["help"]


@pytest.mark.parametrize("command", ["convert", "plan"])
def test_cli_help_is_generated_from_the_config(command):
    params = {p.name: p for p in main.commands[command].params}
    shown = " ".join(CliRunner().invoke(main, [command, "--help"]).output.split())
    for f in dataclasses.fields(MoEConfig):
        help_text = params[f.name].help
        assert f.metadata["help"][1:] in help_text  # the field's own words (first letter capitalised)
        if isinstance(f.default, bool):
            assert f"[default: {'on' if f.default else 'off'}]" in help_text
        elif f.default is not None:
            assert f"[default: {f.default}]" in help_text
        assert params[f.name].default is None  # unset flags leave the default to MoEConfig or the preset
        assert " ".join(help_text.split()[:4]) in shown


def test_cli_flags_reach_the_config(tmp_path):
    from moeify.cli.common import moe_config

    flags = {"num_experts": 3, "top_k": 2, "normalize_gates": True, "dropless": True, "capacity_factor": 1.7,
             "eval_capacity_factor": 3.5, "min_capacity": 7, "aux_loss_coef": 0.03, "z_loss_coef": 0.004,
             "jitter": 0.05, "router_dtype": "float64", "kernel": "reference",
             "every": None, "offset": None}
    assert moe_config("t5-small", flags).routing == RoutingConfig(**ODD)
    assert moe_config("switch-base-128", {"num_experts": None}).num_experts == 128  # a preset's own MoE options


@pytest.mark.parametrize("bad, message", [
    (dict(num_experts=0), "num_experts must be a positive integer, got 0: try num_experts=8"),
    (dict(offset=-1), "offset must be >= 0, got -1"),
    (dict(capacity_factor=float("nan")), "capacity_factor must be a finite number, got nan"),
    (dict(every=2.5), "every must be an integer, got 2.5"),
    (dict(router_dtype="float16"), "router_dtype must be one of float32, float64, bfloat16, got 'float16'"),
    (dict(num_experts=4, top_k=5), "top_k must be between 1 and the 4 experts, got 5: try top_k=2"),
    (dict(top_k=0), "top_k must be between 1 and the 8 experts, got 0"),
    (dict(dropless=1), "dropless must be True or False, got 1"),
])
def test_python_errors_name_the_python_argument(bad, message):
    with pytest.raises(moeify.MoeifyError) as e:
        MoEConfig(**bad)
    assert str(e.value).startswith(message) and "--" not in str(e.value)


def test_default_offset_is_the_last_ffn_of_each_group():
    assert MoEConfig().first == 1 and MoEConfig(every=1).first == 0 and MoEConfig(every=4).first == 3
    assert MoEConfig(every=4, offset=0).first == 0
    every_one = moeify.convert(tiny_t5(), MoEConfig(num_experts=2, every=1))
    assert len(every_one.moeify_record.sites) == 8  # all 4 + 4 FFNs
