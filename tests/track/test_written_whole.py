"""Plots and layer maps are written whole, as every output file: a temporary file beside the target, renamed over
it, so a stop mid-write leaves the old picture (or none), never half of one."""

from __future__ import annotations

import os

from autosquash.compress.plan import Plan
from autosquash.models.arch import Arch
from autosquash.track.layer_map import layer_map_html, layer_map_png
from tests.conftest import TINY_SHAPE


def test_pictures_are_renamed_into_place(tmp_path, monkeypatch):
    arch = Arch.from_config({**TINY_SHAPE, "model_type": "llama"})
    plan = Plan.uniform(arch, "Q4_0")
    renamed = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((str(a), str(b))), real(a, b))[1])
    for name, write in (("map.png", layer_map_png), ("map.html", layer_map_html)):
        path = tmp_path / name
        path.write_bytes(b"the old one")
        write(arch, plan, "a plan", path)
        assert renamed[-1][1] == str(path) and path.read_bytes() != b"the old one"
        assert (
            path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" if name.endswith(".png") else b"<html>" in path.read_bytes()
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.html", "map.png"]  # no temporary left
