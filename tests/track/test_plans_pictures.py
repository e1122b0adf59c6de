"""The per-layer map of a plan and the 2-D views of a search's plots."""

from __future__ import annotations

import struct

import pytest

from autosquash.compress.plan import LayerChoice, Plan, deployed_tensors
from autosquash.models.arch import Arch
from autosquash.track.layer_map import LINEARS, layer_cells, layer_map_html, layer_map_png
from autosquash.track.plots import front_html, front_png, pareto_2d
from tests.conftest import every_form_plan, tiny_config


@pytest.fixture
def arch() -> Arch:
    return Arch.from_config(tiny_config())


def test_cells_count_every_deployed_byte_over_the_unpruned_weights(arch):
    plan = every_form_plan()
    cells = layer_cells(arch, plan)
    assert len(cells) == arch.n_layers and all(len(r) == len(LINEARS) for r in cells)
    # Summed over the cells, the bits are the bytes the cost model prices for the linears (norms, biases and
    # embeddings aside), over each linear's unpruned weight count.
    specs = {t.name: t for t in deployed_tensors(arch, plan)}
    for row in cells:
        for c in row:
            parts = [t for n, t in specs.items() if n.startswith(f"blk.{c.block}.{c.linear}.") and "bias" not in n]
            full = {"attn_q": 256 * 256, "attn_k": 128 * 256, "attn_v": 128 * 256, "attn_output": 256 * 256}
            full |= {"ffn_gate": 512 * 256, "ffn_up": 512 * 256, "ffn_down": 256 * 512}
            assert c.bits_per_weight == pytest.approx(8 * sum(t.nbytes for t in parts) / full[c.linear])
    labels = {(c.block, c.linear): c.label for row in cells for c in row}
    assert labels[(0, "attn_q")] == "Q4_K keep 50%"  # half the KV groups pruned
    assert labels[(0, "ffn_up")].startswith("kron ") and labels[(0, "ffn_up")].endswith("keep 50%")
    assert labels[(1, "attn_v")].startswith("svd ")
    assert labels[(1, "ffn_down")] == "Q8_0 keep 75%"
    assert cells[1][-1].bits_per_weight == pytest.approx(0.75 * 8.5)  # Q8_0: 34 bytes per 32 weights


def test_a_removed_sublayer_is_marked_and_costs_nothing(arch, tmp_path):
    plan = Plan(groups={"blk.1.attn": LayerChoice(quant="Q4_0", attn_keep_ratio=0.0)})
    cells = layer_cells(arch, plan)
    assert [c.label for c in cells[1][:4]] == ["removed"] * 4 and all(c.bits_per_weight == 0 for c in cells[1][:4])
    assert cells[0][0].label == "F16" and cells[0][0].bits_per_weight == pytest.approx(16.0)
    layer_map_png(arch, plan, "t", tmp_path / "m.png")
    layer_map_html(arch, plan, "t", tmp_path / "m.html")
    assert tmp_path.joinpath("m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "removed" in tmp_path.joinpath("m.html").read_text()


def _row(trial, weights, memory, kl, fits=True, origin="sampled"):
    return {
        "trial": trial,
        "origin": origin,
        "state": "COMPLETE",
        "weights_mb": weights,
        "memory_mb": memory,
        "kl": kl,
        "perplexity": 50 + kl,
        "energy_mj_per_token": 90.0,
        "bits_per_weight": 5.0,
        "plan": f"plans/trial-{trial:04d}.yaml",
        "fits": fits,
    }


def test_the_line_of_a_view_passes_only_through_plans_no_other_beats_there():
    rows = [
        _row(0, 100, 450, 0.01, origin="baseline"),
        _row(1, 80, 430, 0.30),
        _row(2, 90, 500, 0.05),  # smaller weights than 0 but the largest peak memory (say a longer KV cache)
        _row(3, 95, 445, 0.20),  # beaten in both views by trial 2 on weights... but not on memory
        _row(4, 70, 420, 0.01, fits="False"),  # does not fit the phone: never on a line
        {**_row(5, 60, 400, 0.0), "state": "FAIL"},
    ]
    assert [r["trial"] for r in pareto_2d(rows, "weights_mb", "kl")] == [1, 2, 0]
    assert [r["trial"] for r in pareto_2d(rows, "memory_mb", "kl")] == [1, 3, 0]


def test_both_views_are_drawn(tmp_path):
    rows = [_row(0, 100, 450, 0.01, origin="baseline"), _row(1, 80, 430, 0.30), _row(2, 90, 500, 0.05)]
    front_png(rows, rows[:2], "kl", 460.0, "t", tmp_path / "p.png")
    width, height = struct.unpack(">II", tmp_path.joinpath("p.png").read_bytes()[16:24])
    assert width > 1.8 * height  # two panels side by side
    front_html(rows, rows[:2], "kl", 460.0, "t", tmp_path / "p.html")
    page = tmp_path.joinpath("p.html").read_text()
    assert "weights (MB)" in page and "peak memory on the phone (MB)" in page and "app memory limit" in page


def test_peer_files_are_triangles_named_by_recipe_and_stay_off_the_line(tmp_path):
    rows = [_row(0, 100, 450, 0.01, origin="baseline"), _row(1, 80, 430, 0.30)]
    peers = [{**_row(9, 85, 435, 0.02), "name": "Q3_K_M", "file": "peer-Q3_K_M-imatrix.gguf"}]
    front_html(rows, rows, "kl", 460.0, "t", tmp_path / "with.html", peers)
    front_html(rows, rows, "kl", 460.0, "t", tmp_path / "without.html")
    page = tmp_path.joinpath("with.html").read_text()
    assert "llama.cpp recipes" in page and "triangle-up-open" in page and "peer-Q3_K_M-imatrix.gguf" in page
    assert "llama.cpp recipes" not in tmp_path.joinpath("without.html").read_text()
    # a peer is a point to compare with, not a plan of the search: the line ignores it
    assert [r["trial"] for r in pareto_2d(rows, "weights_mb", "kl")] == [1, 0]
    front_png(rows, rows, "kl", 460.0, "t", tmp_path / "p.png", peers)
    front_png(rows, rows, "kl", 460.0, "t", tmp_path / "q.png")
    assert tmp_path.joinpath("p.png").read_bytes() != tmp_path.joinpath("q.png").read_bytes()
