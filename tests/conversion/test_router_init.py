"""--router-init hidden: router rows from k-means of each site's inputs on calibration text; its load balance."""
import pytest
import torch
from clitools import assert_user_error, run
from tiny import tiny_net, tiny_t5

import moeify
from moeify.conversion.router_init import expert_loads, hidden_router, load_cv
from moeify.conversion.samples import BATCH_SIZE, BATCHES, SEQ_LEN, site_samples
from moeify.layers.router import Router
from moeify.layers.switch import switch_layers


def test_clear_clusters_give_a_balanced_router_where_a_random_one_is_not():
    # Four directions of 64 tokens each over a large shared component, as hidden states have.
    g = torch.Generator().manual_seed(0)
    planted = torch.arange(4).repeat_interleave(64)
    x = 5 * torch.randn(16, generator=g) + torch.randn(4, 16, generator=g)[planted] + 0.05 * torch.randn(256, 16,
                                                                                                        generator=g)
    weight = hidden_router(x, 4, torch.Generator().manual_seed(0), "site")
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(4, dtype=weight.dtype))
    assert expert_loads(weight, x, 1).tolist() == [64] * 4 and load_cv(expert_loads(weight, x, 1)) == 0.0
    chosen = (x.double() @ weight.t()).argmax(1)
    assert all(len(set(chosen[planted == c].tolist())) == 1 for c in range(4))  # one cluster, one expert
    random = Router(16, 4)
    random.reset_parameters(0.1, torch.Generator().manual_seed(0))
    assert load_cv(expert_loads(random.weight.detach(), x, 1)) > 0.5  # the shared component picks favourites


def test_load_cv_is_std_over_mean():
    assert load_cv(torch.tensor([4, 4, 4, 4])) == 0.0
    assert load_cv(torch.tensor([8, 0, 0, 0])) == pytest.approx(3 ** 0.5)  # everything on one of 4: sqrt(E - 1)
    assert load_cv(torch.tensor([3, 1])) == 0.5


@torch.no_grad()
def test_hidden_routers_replace_only_the_routers_and_report_what_they_measure():
    moe = dict(num_experts=4, every=1)
    hidden = moeify.convert(tiny_t5(), moeify.MoEConfig(**moe, router_init="hidden"))
    random = moeify.convert(tiny_t5(), moeify.MoEConfig(**moe))
    h, r = hidden.state_dict(), random.state_dict()
    assert all(torch.equal(h[k], r[k]) for k in h if not k.endswith("router.weight"))
    config = hidden.moeify_record.config
    samples = site_samples(tiny_t5(), hidden.moeify_record.sites, config)
    reports = hidden.moeify_record.init_reports
    for name, layer in switch_layers(hidden).items():
        x, report = samples[name].x, reports[name]
        torch.testing.assert_close(layer.router.weight.norm(dim=1), torch.ones(4))
        assert report.tokens == BATCHES * BATCH_SIZE * (SEQ_LEN if name.startswith("encoder") else SEQ_LEN // 4)
        assert report.load_cv == load_cv(expert_loads(layer.router.weight, x, 1))
        assert report.random_load_cv == load_cv(expert_loads(random.get_submodule(name).router.weight, x, 1))
        assert report.top1_error is None
    cvs = [(rep.load_cv, rep.random_load_cv) for rep in reports.values()]
    assert sum(c for c, _ in cvs) < sum(c for _, c in cvs)  # on average more balanced than random, on real text


def test_a_model_that_reads_no_token_ids_is_refused():
    with pytest.raises(moeify.MoeifyError) as e:
        moeify.convert(tiny_net(), moeify.MoEConfig(num_experts=2, router_init="hidden"))
    assert str(e.value) == ("router_init='hidden' routes calibration text through the model, but Net has no "
                            "config.vocab_size (it is not a transformers language model): use router_init='random'")
    # moefy needs no text, only its report does: a custom module converts without one.
    assert moeify.convert(tiny_net(), moeify.MoEConfig(num_experts=2, init="moefy")).moeify_record.init_reports == {}


def test_the_text_option(tmp_path, hf_t5_dir):
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    with pytest.raises(moeify.MoeifyError) as e:
        moeify.convert(tiny_t5(), moeify.MoEConfig(router_init="hidden", text=str(short)))
    assert str(e.value) == ("the calibration text has 14 tokens, fewer than the 1280 of one batch: give more text "
                            "with text")
    with pytest.raises(moeify.MoeifyError) as e:
        moeify.MoEConfig(text=str(short))
    assert str(e.value) == ("text is read only by router_init='hidden' and init='moefy': drop text or add "
                            "router_init='hidden'")
    with pytest.raises(moeify.MoeifyError) as e:
        moeify.MoEConfig(init="moefy", router_init="hidden")
    assert str(e.value) == ("router_init hidden does not apply to init='moefy', whose router starts from its neuron "
                            "clusters' centroids: drop router_init")
    assert_user_error(run("convert", hf_t5_dir, "--router-init", "hidden", "--text", tmp_path / "missing.txt",
                          "-o", tmp_path / "out"), tmp_path,
                      f"error: --text '{tmp_path / 'missing.txt'}' cannot be read (No such file or directory)")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    result = run("convert", hf_t5_dir, "--router-init", "hidden", "--text", text, "--experts", "4", "--no-check",
                 "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "initialisation measured on calibration text (upcycle, router hidden)" in " ".join(result.output.split())
    assert moeify.load(tmp_path / "out").moeify_record.config.text == str(text)


def test_the_default_options_run_no_text(monkeypatch):
    import moeify.conversion.pipeline as pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("calibration text was routed")

    monkeypatch.setattr(pipeline, "site_samples", refuse)
    sparse = moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=4, upcycle_scale="auto"))
    assert sparse.moeify_record.init_reports == {}
    with pytest.raises(AssertionError, match="calibration text was routed"):
        moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=4, router_init="hidden"))
