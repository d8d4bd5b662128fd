import json
import re
from pathlib import Path

import networkx as nx
import pytest
from clitools import assert_fits, run


def test_plan_a_preset_on_meta_then_inspect_and_draw(tmp_path):
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    result = run("plan", "switch-base-128", "--topology", "dgx-a100", "--nodes", 2, "-o", out, "--draw", png)
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    assert plan["world_size"] == 16 and len(plan["layers"]) == 12
    assert plan["layers"][0]["num_experts"] == 128
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    shown = run("inspect", out)
    assert shown.exit_code == 0 and "expert-parallel group" in shown.stdout and "bound" in shown.stdout
    assert json.loads(run("inspect", out, "--json").stdout)["world_size"] == 16


def test_plan_a_converted_directory_with_calibrated_load(tmp_path, hf_t5_dir):
    model = tmp_path / "m"
    assert run("convert", hf_t5_dir, "--experts", 4, "--no-check", "-o", model).exit_code == 0
    load = tmp_path / "load.json"
    result = run("calibrate", model, "--batches", 2, "--batch-size", 2, "--seq-len", 32, "-o", load)
    assert result.exit_code == 0, result.output
    data = json.loads(load.read_text())
    assert data["schema"] == "moeify.load" and len(data["layers"]) == 4
    first = next(iter(data["layers"].values()))
    assert sum(first["tokens"]) == 2 * 2 * 32 and sum(first["fraction"]) == pytest.approx(1.0)
    result = run("plan", model, "--topology", "hgx-a100-4", "--load", load, "-o", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "p.json").read_text())["model"]["calibrated"] is True


def test_plan_from_a_topology_file(tmp_path):
    g = nx.Graph()
    for i in range(2):
        g.add_node(f"node0/gpu{i}", kind="gpu", host="node0", local_index=i, numa=0, device="x",
                   memory_GB=80.0, peak_TFLOPs=100.0)
    g.add_edge("node0/gpu0", "node0/gpu1", bw_GBps=50.0, latency_us=1.0, link="nvlink3")
    topo = tmp_path / "cluster.json"
    topo.write_text(json.dumps(nx.node_link_data(g, edges="links")))
    result = run("plan", "switch-base-128", "--topology", topo, "--experts", 8, "-o", tmp_path / "p.json")
    assert result.exit_code == 0, result.output


def bad_topology(tmp_path, kind):
    g = nx.Graph()
    for i in range(3):
        g.add_node(f"node0/gpu{i}", kind="gpu", host="node0", local_index=i, numa=0, device="x",
                   memory_GB=80.0, peak_TFLOPs=100.0)
    g.add_edge("node0/gpu0", "node0/gpu1", bw_GBps=0.0 if kind == "zero" else 50.0, latency_us=1.0, link="nvlink3")
    if kind == "zero":
        g.add_edge("node0/gpu1", "node0/gpu2", bw_GBps=50.0, latency_us=1.0, link="nvlink3")
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(nx.node_link_data(g, edges="edges")))
    return path


@pytest.mark.parametrize("args,message", [
    (["--topology", "dgx-a101"], "dgx-a100"),
    (["--topology", "dgx-a100", "--nodes", "0"], "nodes"),
    (["--topology", "DISCONNECTED"], "every GPU must reach every other"),
    (["--topology", "ZERO"], "bw_GBps"),
    (["--topology", "dgx-a100", "--experts", "6", "--expert-parallel", "4"], "--allow-uneven"),
    (["--topology", "hgx-a100-4", "--experts", "1024", "--tokens-per-rank", "1024"], "does not fit"),
])
def test_bad_plan_input_is_one_line_and_exit_2(tmp_path, args, message):
    args = [str(bad_topology(tmp_path, "disconnected")) if a == "DISCONNECTED" else
            str(bad_topology(tmp_path, "zero")) if a == "ZERO" else a for a in args]
    out = tmp_path / "p.json"
    result = run("plan", "switch-base-128", *args, "-o", out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not out.exists()


def test_plan_from_nvidia_smi_output_names_the_gpu_model(tmp_path):
    topo = Path(__file__).parent.parent / "fixtures" / "topo" / "pcie-4gpu-2numa.txt"
    out = tmp_path / "p.json"
    result = run("plan", "switch-base-128", "--topology", topo, "--nodes", 2, "--gpu", "H100-PCIE-80GB",
                 "--experts", 8, "-o", out)
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    assert plan["world_size"] == 8 and plan["topology"]["device"] == "H100-PCIE-80GB"
    assert plan["topology"]["name"] == "2 x pcie-4gpu-2numa"


def test_bad_load_and_calibrate_input(tmp_path, hf_t5_dir):
    model = tmp_path / "m"
    assert run("convert", hf_t5_dir, "--experts", 4, "--no-check", "-o", model).exit_code == 0
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"schema": "moeify.load", "layers": {"nope": {"fraction": [1.0]}}}))
    cases = [
        (["plan", model, "--topology", "hgx-a100-4", "--load", tmp_path / "none.json"], "does not exist"),
        (["plan", model, "--topology", "hgx-a100-4", "--load", wrong], "names layers this model lacks"),
        (["calibrate", hf_t5_dir, "-o", tmp_path / "l.json"], "moeify"),
        (["calibrate", model, "--seq-len", 4096, "--batch-size", 64, "--text", wrong, "-o", tmp_path / "l.json"],
         "fewer than one batch"),
    ]
    for args, message in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
    assert not (tmp_path / "l.json").exists()


def test_plan_and_its_inspection_read_at_80_columns(tmp_path, console80):
    out = tmp_path / "plan.json"
    result = run("plan", "switch-base-128", "--topology", "dgx-a100", "--nodes", 2, "-o", out)
    assert result.exit_code == 0, result.output
    assert_fits(result.stdout)
    rows = re.findall(r"^(\*| ) +(\d+ x \d+) +(contiguous|strided) +(flat|hierarchical)( \+ hierarchical)? +"
                      r"([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) +(yes|no)\s*$", result.stdout, flags=re.MULTILINE)
    plan = json.loads(out.read_text())
    assert len(rows) == len(plan["alternatives"]) and [r[0] for r in rows].count("*") == 1
    chosen = next(r for r in rows if r[0] == "*")
    assert chosen[1] == f"{plan['mesh']['shape'][0]} x {plan['mesh']['shape'][1]}" and chosen[2] == plan["layout"]
    shown = run("inspect", out)
    assert shown.exit_code == 0, shown.output
    assert_fits(shown.stdout)
    assert shown.stdout.count("*  ") == 1
    layer_rows = [line.split() for line in shown.stdout.splitlines() if "DenseReluDense" in line]
    assert [row[0] for row in layer_rows] == [layer["name"] for layer in plan["layers"]]  # whole names
    assert "layers (128 experts each)" in shown.stdout
    assert re.search(r"^ +15  E120-127\s*$", shown.stdout, flags=re.MULTILINE), shown.stdout



def test_an_interrupt_while_drawing_leaves_no_temporary(monkeypatch, tmp_path):
    """SIGTERM reaches the CLI as an exception: one that lands while the picture is written leaves no half-written
    temporary beside it."""
    import matplotlib.figure

    real = matplotlib.figure.Figure.savefig

    def interrupted(self, fname, *args, **kwargs):
        real(self, fname, *args, **kwargs)  # the temporary is written, then the interrupt comes
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted)
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    result = run("plan", "switch-base-128", "--topology", "dgx-a100", "--nodes", 2, "-o", out, "--draw", png)
    assert result.exit_code != 0
    assert not png.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
