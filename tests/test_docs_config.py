"""docs/configuration.md is generated from omni_ray/config.py by tools/gen_config_docs.py and kept in sync."""

from __future__ import annotations

import re
import subprocess
import sys

from omni_ray import config as cfgmod
from tools import gen_config_docs as dc


def test_committed_reference_equals_the_generated_text():
    assert dc.OUT.exists(), "docs/configuration.md missing: run `python tools/gen_config_docs.py --write`"
    assert dc.OUT.read_text() == dc.render(), "stale: run `python tools/gen_config_docs.py --write`"


def test_every_model_and_field_is_documented():
    text = dc.generate()
    for model, _ in dc.walk():
        assert f"### {model.__name__}" in text
        for name in model.model_fields:
            assert re.search(rf"^\| `{name}` \|", text, re.M), f"{model.__name__}.{name}"
    assert {m for m, _ in dc.walk()} >= {cfgmod.OmniConfig, cfgmod.AREngineConfig, cfgmod.DiTEngineConfig,
                                         cfgmod.DeploymentConfig, cfgmod.MetricsConfig, cfgmod.PipelineStep}


def test_rows_show_type_bounds_default_and_description():
    text = dc.generate()
    row = next(line for line in text.splitlines() if line.startswith("| `max_num_seqs` |"))
    assert "int, >= 1" in row and "`512`" in row and "sequences in the running batch" in row
    assert "`stages.<name>.engine.cache`" in text           # where a model appears
    assert "*required*" in text


def test_descriptions_carry_no_measurements():
    """Field descriptions say what a field does; figures live in docs/benchmarks.md."""
    text = dc.generate()
    for pattern in (r"tok/s", r"\bH[12]00\b", r"\d ?µs", r"\d+(\.\d+)? ?ms\b", r"\d{4}-\d{2}-\d{2}"):
        assert not re.search(pattern, text), pattern


def test_write_and_check_round_trip(tmp_path, capsys):
    out = tmp_path / "configuration.md"
    assert dc.main(["--check", "--out", str(out)]) == 1          # missing
    out.write_text("old\n")
    assert dc.main(["--check", "--out", str(out)]) == 1          # stale
    assert dc.main(["--write", "--out", str(out)]) == 0
    assert dc.main(["--check", "--out", str(out)]) == 0
    assert out.read_text().startswith("# Configuration reference\n")


def test_runs_as_a_script_from_the_checkout():
    r = subprocess.run([sys.executable, str(dc.ROOT / "tools" / "gen_config_docs.py"), "--check"],
                       cwd=dc.ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
