"""Every script in examples/ runs, with short settings, and prints what it promises."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SHORT_ARGS = {  # the command line each example runs with here: a few steps, a few experts
    "custom_module.py": [],  # one training step already
    "upcycle_on_stdlib.py": ["--pretrain-steps", "2", "--steps", "2", "--experts", "4"],
    "init_methods_on_stdlib.py": ["--pretrain-steps", "2", "--experts", "4"],
}


def run_example(name: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *SHORT_ARGS[name]], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=180)  # this checkout's moeify, installed or not
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_every_example_has_a_test():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SHORT_ARGS)


def test_custom_module():
    lines = run_example("custom_module.py")
    assert lines[0] == "['blocks.1.mlp', 'blocks.3.mlp']"  # MoEConfig's default: every other block from 1
    # Dense TinyLM: embedding 256*64 + head 64*256+256 + 4 blocks of (LayerNorm 128 + MLP 33,088) = 165,888.
    # Blocks 1 and 3 hold 8 experts of 33,088 and a 64 -> 8 router (512) instead of one MLP;
    # a token uses one expert, so it sees 165,888 + 2 * 512 parameters.
    assert lines[1] == "630,144 parameters, 166,912 active per token"
    m = re.fullmatch(r"lm loss ([\d.]+), router losses ([\d.]+), dropped ([\d.]+)% of tokens", lines[2])
    assert m, lines[2]
    lm_loss, router, dropped = map(float, m.groups())
    assert abs(lm_loss - math.log(256)) < 1.0  # an untrained model is near uniform over 256 tokens
    assert 0 < router < 1 and 0 <= dropped < 100
    assert lines[3:] == ["saved and loaded: outputs identical"]


@pytest.mark.slow
def test_upcycle_on_stdlib():
    lines = run_example("upcycle_on_stdlib.py")
    assert lines[0] == "corpus: 4,000,000 bytes of the standard library's source"
    # The dense T5 has 952,448 parameters; 4 FFNs (2 encoder, 2 decoder) of 2 * 128 * 512 each become
    # 4 experts plus a 128 -> 4 router: 952,448 + 4 * (3 * 131,072 + 512), of which a token uses 4 * 512 more.
    assert "upcycled: 952,448 -> 2,527,360 parameters, 954,496 active per token" in lines
    steps = [re.fullmatch(r"  (dense|switch) +step +(\d+)  loss ([\d.]+)(?: dropped +([\d.]+)%)?  \(\d+s\)", line)
             for line in lines if "step" in line]
    assert all(steps), lines
    # Pre-training, then dense and Switch continued: two steps each, every one reported.
    assert [(s[1], int(s[2])) for s in steps] == [("dense", 1), ("dense", 2)] * 2 + [("switch", 1), ("switch", 2)]
    assert all(float(s[3]) < math.log(259) + 1 for s in steps)  # byte tokens: at most about uniform
    assert all((s[4] is None) == (s[1] == "dense") for s in steps)  # only Switch models drop tokens
    m = re.fullmatch(r"final loss: dense ([\d.]+), switch ([\d.]+)", lines[-1])
    assert m, lines[-1]
    assert (float(m[1]), float(m[2])) == (float(steps[3][3]), float(steps[5][3]))  # the last steps' means


def test_init_methods_on_stdlib():
    lines = run_example("init_methods_on_stdlib.py")
    base = float(re.fullmatch(r"dense: pre-trained 2 steps in \d+s, held-out loss ([\d.]+)", lines[0])[1])
    for k, line in zip((1, 2), lines[1:3]):
        m = re.fullmatch(rf"upcycle top-{k}: scale none ([\d.]+) \([+-][\d.]+%\), auto ([\d.]+) \([+-][\d.]+%\)", line)
        assert m, line
        assert abs(float(m[2]) / base - 1) < 0.03  # barely trained: FFNs matter little yet (README: trained)
    m = re.fullmatch(r"moefy: experts 128 wide; relative error of each token's top-1 expert ([\d.]+), top-2 ([\d.]+) "
                     r"\(mean of 4 layers; untrained: ([\d.]+), ([\d.]+)\)", lines[3])
    assert m, lines[3]
    assert 0 < float(m[2]) < float(m[1]) < 1
    m = re.fullmatch(r"router load CV \(std / mean of tokens per expert, mean of 4 layers\): hidden ([\d.]+), "
                     r"random ([\d.]+)", lines[4])
    assert m, lines[4]
