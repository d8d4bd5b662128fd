"""`moeify train`: loss falls, routers learn, metrics and checkpoints are written, resume is exact, bad input exits 2."""
import csv
import json
import math
import random
import signal

import pytest
import torch
from clitools import assert_user_error, run
from safetensors.torch import load_file

from moeify.training.fit import StopRequest

WORDS = ("the expert router sends each token to one feed forward network and the load balancing loss keeps "
         "experts busy while capacity limits how many tokens one expert takes per batch").split()
FAST = ("--seq-len", 32, "--batch-size", 4, "--validation-batches", 1, "--warmup", 5, "--lr", 3e-3)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """60 KB of sentences from a 26-word vocabulary: learnable in a few dozen steps, deterministic."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(800)))
    return path


def train(source, out, text, *args):
    return run("train", source, "-o", out, "--text", text, *FAST, *args)


def rows(out):
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_switch_t5_loss_falls_and_metrics_checkpoints_are_written(tmp_path, text):
    out = tmp_path / "out"
    result = train("t5-tiny", out, text, "--experts", 4, "--steps", 60, "--log-every", 1, "--eval-every", 30,
                   "--save-every", 20, "--keep", 2)
    assert result.exit_code == 0, result.output
    table = rows(out)
    assert list(table[0])[:10] == ["step", "tokens", "wall_seconds", "lr", "train_loss", "val_loss", "aux_loss",
                                   "z_loss", "dropped_fraction", "load_cv_mean"]
    layers = [c for c in table[0] if c.startswith("load_cv/")]
    assert len(layers) == 4  # every other FFN of 4 encoder + 4 decoder blocks
    assert [int(r["step"]) for r in table] == list(range(1, 61))
    assert int(table[-1]["tokens"]) == 60 * 4 * 32
    first = sum(float(r["train_loss"]) for r in table[:10]) / 10
    last = sum(float(r["train_loss"]) for r in table[-10:]) / 10
    assert last < first - 1.0, (first, last)  # from ~ln(384) = 5.95 to well under it
    assert [r["step"] for r in table if r["val_loss"]] == ["30", "60"]
    assert float(table[59]["val_loss"]) < float(table[29]["val_loss"])
    for r in table:
        assert math.isfinite(float(r["aux_loss"])) and float(r["aux_loss"]) > 0
        assert math.isfinite(float(r["z_loss"])) and 0 <= float(r["dropped_fraction"]) < 1
        cvs = [float(r[c]) for c in layers]
        assert float(r["load_cv_mean"]) == pytest.approx(sum(cvs) / len(cvs))
    info = json.loads((out / "run.json").read_text())
    assert (info["dense"], info["steps"], info["objective"], info["moe_config"]["num_experts"]) == \
        (False, 60, "span_corruption", 4)
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "step-40", "step-60"]  # --keep 2
    trainer = json.loads((checkpoints / "step-60" / "trainer.json").read_text())
    assert (trainer["step"], trainer["data_position"]["step"], trainer["train"]["lr"]) == (60, 60, 3e-3)
    assert json.loads((checkpoints / "best" / "trainer.json").read_text())["step"] == 60
    assert "interrupted" not in result.output and "trained 60 steps, 7,680 tokens" in result.output


def test_routers_receive_gradients_and_move(text):
    import moeify
    from moeify.checkpoint.sources import load_dense
    from moeify.training.config import DataConfig, TrainConfig
    from moeify.training.data import prepare_data
    from moeify.training.loop import Trainer

    model = moeify.convert(load_dense("t5-tiny").model, moeify.MoEConfig(num_experts=4), inplace=True)
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if ".router." in n}
    assert len(routers) == 4
    trainer = Trainer(model, TrainConfig(steps=2, warmup=0))
    data = prepare_data(model, DataConfig(text=text, seq_len=32, batch_size=4))
    result = trainer.train_step(next(data.train))
    assert result.aux_loss > 0 and math.isfinite(float(result.loss))
    for name, param in model.named_parameters():
        if name in routers:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
            assert not torch.equal(param.detach(), routers[name]), name


def test_training_steps_and_evaluation_build_no_key_value_cache(text):
    """T5 builds a decoder cache by default; a loss needs none (its concatenations cost 8 % of a step)."""
    import moeify
    from moeify.checkpoint.sources import load_dense
    from moeify.training.config import DataConfig, TrainConfig
    from moeify.training.data import prepare_data
    from moeify.training.loop import Trainer, no_cache

    model = moeify.convert(load_dense("t5-tiny").model, moeify.MoEConfig(num_experts=2), inplace=True)
    assert model.config.use_cache
    data = prepare_data(model, DataConfig(text=text, seq_len=32, batch_size=2))
    batch = next(data.train)
    assert model(**batch).past_key_values is not None  # what a plain call builds
    outputs = []
    model.register_forward_hook(lambda module, args, output: outputs.append(output))
    trainer = Trainer(model, TrainConfig(steps=1, warmup=0))
    trainer.train_step(batch)
    trainer.evaluate([batch])
    assert len(outputs) == 2 and all(o.past_key_values is None for o in outputs)
    assert no_cache(torch.nn.Linear(2, 2)) == {}  # a forward without the argument gets nothing extra


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_resume_repeats_the_uninterrupted_run_exactly(tmp_path, text, optimizer):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--experts", 4, "--log-every", 1, "--eval-every", 0, "--optimizer", optimizer)
    assert train("t5-tiny", straight, text, *common, "--steps", 6).exit_code == 0
    assert train("t5-tiny", split, text, *common, "--steps", 3).exit_code == 0
    resumed = run("train", "-o", split, "--resume", "--steps", 6)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output and "step-3" in resumed.output
    a, b = rows(straight), rows(split)
    assert [r["step"] for r in b] == ["1", "2", "3", "4", "5", "6"]
    for x, y in zip(a, b):  # repr floats round-trip: equal text is equal float32 losses
        assert (x["train_loss"], x["lr"], x["aux_loss"], x["tokens"]) == (y["train_loss"], y["lr"], y["aux_loss"],
                                                                          y["tokens"])
    wa = load_file(straight / "checkpoints/step-6/moeify-model.safetensors")
    wb = load_file(split / "checkpoints/step-6/moeify-model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((split / "run.json").read_text())["steps"] == 6


def test_dense_baseline_trains_unconverted_and_resumes(tmp_path, text):
    out = tmp_path / "out"
    assert train("t5-tiny", out, text, "--dense", "--steps", 2, "--log-every", 1, "--group", "dense").exit_code == 0
    info = json.loads((out / "run.json").read_text())
    assert (info["dense"], info["moe_config"], info["group"]) == (True, None, "dense")
    assert [r["aux_loss"] for r in rows(out)] == ["", ""] and list(rows(out)[0])[-1] == "load_cv_mean"
    assert (out / "checkpoints/step-2/config.json").is_file()
    assert run("train", "-o", out, "--resume", "--steps", 3).exit_code == 0
    assert [r["step"] for r in rows(out)] == ["1", "2", "3"]
    assert json.loads((out / "run.json").read_text())["group"] == "dense"  # kept by --resume


def test_causal_lm_from_a_local_directory_and_bf16(tmp_path, text):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    source = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
                     ).save_pretrained(source)
    out = tmp_path / "out"
    result = train(source, out, text, "--experts", 2, "--every", 1, "--steps", 2, "--log-every", 1,
                   "--precision", "bf16")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["objective"] == "causal_lm"
    assert all(math.isfinite(float(r["train_loss"])) for r in rows(out))
    import moeify

    model = moeify.load(out / "checkpoints/step-2")
    assert {p.dtype for n, p in model.named_parameters() if ".router." in n} == {torch.float32}


def test_masked_lm_bert(tmp_path, text):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    source = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, max_position_embeddings=64)).save_pretrained(source)
    out = tmp_path / "out"
    result = train(source, out, text, "--experts", 2, "--steps", 2)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["objective"] == "masked_lm"


def test_stop_request_checkpoints_then_a_second_ctrl_c_raises():
    stop = StopRequest()
    stop(signal.SIGINT, None)
    assert stop.requested
    with pytest.raises(KeyboardInterrupt):
        stop(signal.SIGINT, None)


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, text, monkeypatch):
    monkeypatch.setattr(StopRequest, "install", lambda self: (setattr(self, "requested", True),
                                                             signal.getsignal(signal.SIGINT))[1])
    out = tmp_path / "out"
    result = train("t5-tiny", out, text, "--experts", 4, "--steps", 5)
    assert result.exit_code == 130, result.output
    assert f"interrupted at step 1: saved {out / 'checkpoints' / 'step-1'}" in result.output
    assert json.loads((out / "checkpoints/step-1/trainer.json").read_text())["step"] == 1


def test_a_second_ctrl_c_during_the_save_exits_at_once_and_keeps_the_last_checkpoint(tmp_path, text, monkeypatch):
    """Both signals are real SIGINTs to this process, through the handler `moeify train` installs: the first
    after step 3, the second while step 3's checkpoint is half written (weights on disk, trainer.json not)."""
    import os

    from moeify.checkpoint import store
    from moeify.training.loop import Trainer

    train_step, save = Trainer.train_step, store.save

    def step_then_ctrl_c(self, batch):
        result = train_step(self, batch)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    def save_then_ctrl_c(model, path, **kw):
        save(model, path, **kw)
        if signal.getsignal(signal.SIGINT).requested:  # the handler of this run: the stop checkpoint
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    monkeypatch.setattr(store, "save", save_then_ctrl_c)
    out = tmp_path / "out"
    result = train("t5-tiny", out, text, "--experts", 2, "--steps", 10, "--save-every", 2, "--eval-every", 0,
                   "--log-every", 1)
    assert result.exit_code == 130, result.output
    assert result.stderr == (f"stopped at once: the last complete checkpoint is {out / 'checkpoints' / 'step-2'}; "
                             f"continue with moeify train -o {out} --resume\n")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]  # step 3's temporary is gone
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was put back
    monkeypatch.undo()
    resumed = run("train", "-o", out, "--resume", "--steps", 4)
    assert resumed.exit_code == 0, resumed.output
    assert [int(r["step"]) for r in rows(out)] == [1, 2, 3, 4]  # step 3's row was logged again


@pytest.mark.parametrize("args, message", [
    (("--text", "missing.txt"), "--text 'missing.txt' does not exist"),
    (("--steps", 0), "--steps 0 must be at least 1"),
    (("--dense", "--experts", 4), "--dense trains unconverted: drop --experts"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert_user_error(run("train", "t5-tiny", "-o", tmp_path / "out", "--seq-len", 32, *args), tmp_path, message)


def test_an_empty_corpus_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    result = run("train", "t5-tiny", "-o", tmp_path / "out", "--text", tmp_path / "empty")
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {tmp_path / 'empty'} holds no text: point --text at a non-empty UTF-8 file or " \
                            "directory, or --data at a JSONL file with text\n"
    assert not (tmp_path / "out").exists()


def test_an_unknown_optimizer_is_a_usage_error(tmp_path):
    result = run("train", "t5-tiny", "-o", tmp_path / "out", "--optimizer", "sgd")
    assert result.exit_code == 2 and "Invalid value for '--optimizer'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_run_directory_errors(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = run("train", "t5-tiny", "-o", out)
    assert result.exit_code == 2
    assert result.stderr == f"error: {out} already exists: pass --resume to continue it, --force to replace it, " \
                            "or choose another -o\n"
    result = run("train", "-o", out, "--resume")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {out} has no checkpoint to resume from"), result.stderr
    result = run("train", "-o", out, "--resume", "--lr", 0.1)
    assert result.stderr == "error: --resume continues with the run's saved options: drop --lr\n"
    result = run("train", "-o", out, "--resume", "--group", "g")
    assert result.stderr == "error: --resume continues with the run's saved options: drop --group\n"
    (out / "config.json").write_text("{}")  # a source directory that -o names itself, or lies inside
    for target, how in ((out, "is the source directory"), (out / "run", "lies inside the source directory")):
        result = run("train", out, "-o", target, "--force")
        assert result.exit_code == 2 and result.stderr == f"error: -o {target} {how} {out}: choose an output path " \
                                                          "outside it\n", result.stderr
    assert list(out.iterdir()) == [out / "config.json"]  # --force deleted nothing


def test_sigint_to_a_real_process_checkpoints_and_the_run_resumes(tmp_path, text):
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "moeify.cli", "train", "t5-tiny", "-o", str(out), "--text", str(text),
                             *map(str, FAST), "--experts", "4", "--steps", "100000", "--log-every", "1",
                             "--eval-every", "0", "--save-every", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ((out / "metrics.csv").is_file() and len(rows(out)) >= 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    step = json.loads((max((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:])) / "trainer.json")
                      .read_text())["step"]
    assert f"interrupted at step {step}: saved {out / 'checkpoints' / f'step-{step}'}" in stdout
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporaries left
    resumed = run("train", "-o", out, "--resume", "--steps", step + 1)
    assert resumed.exit_code == 0, resumed.output
    assert [int(r["step"]) for r in rows(out)] == list(range(1, step + 2))


def test_a_moeify_directory_trains_as_it_was_converted(tmp_path, text):
    converted = tmp_path / "switch"
    assert run("convert", "t5-tiny", "--experts", 2, "--no-check", "-o", converted).exit_code == 0
    result = train(converted, tmp_path / "out", text, "--steps", 1)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out/run.json").read_text())["moe_config"]["num_experts"] == 2
    result = train(converted, tmp_path / "other", text, "--steps", 1, "--experts", 4)
    assert result.exit_code == 2
    assert result.stderr == "error: a moeify directory trains as it was converted: drop --experts\n"
    assert not (tmp_path / "other").exists()
