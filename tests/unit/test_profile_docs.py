"""README "Protocol profiles": its table of differences is generated from the two Profile objects and
from specs/*.yaml against specs/current/*.yaml, and must equal what the code says today."""
from __future__ import annotations

import os

from macp_runtime.registries.profile import differences_table

from tests.support import ROOT

BEGIN, END = "<!-- profile-table:begin -->\n", "<!-- profile-table:end -->"


def test_readme_table_matches_the_profiles_and_specs():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    table = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    assert table == differences_table(), "README's profile table is stale: run scripts/profile-table"


def test_every_current_spec_replaces_a_v040_spec_of_the_same_mode():
    import glob

    import yaml

    from macp_runtime.specs import SPECS_DIR
    for path in glob.glob(os.path.join(SPECS_DIR, "current", "*.yaml")):
        base = os.path.join(SPECS_DIR, os.path.basename(path))
        with open(path, encoding="utf-8") as a, open(base, encoding="utf-8") as b:
            assert yaml.safe_load(a)["mode"] == yaml.safe_load(b)["mode"]
