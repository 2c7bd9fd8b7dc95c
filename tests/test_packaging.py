"""A plain ``pip install .`` must carry every package: setup.cfg lists them by hand (the
mapped cuda/ and scenarios/ folders rule out ``find:``), so a new one is checked here."""

from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_synapse_package_is_listed_in_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}
    present = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "synapse").rglob("__init__.py")}
    assert present - listed == set(), "packages missing from setup.cfg [options] packages"
