"""The README's configuration reference is generated from omni_ray/config.py and kept in sync."""

from __future__ import annotations

import re

import pytest

from omni_ray import config as cfgmod
from omni_ray import docs_config as dc


def test_readme_section_equals_the_generated_text():
    readme = dc.README.read_text()
    assert dc.START in readme and dc.END in readme
    stale = "stale: run `omni-ray docs --write` (or python -m omni_ray.docs_config --write)"
    assert dc.current(readme) == dc.generate(), stale
    assert readme.index("## Configuration reference") < readme.index(dc.START) < readme.index("## Tests")


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


def test_write_and_check_round_trip(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Configuration reference\n\n{dc.START}\nold\n{dc.END}\n\n## Tests\n")
    assert dc.main(["--check", "--readme", str(readme)]) == 1
    assert dc.main(["--write", "--readme", str(readme)]) == 0
    assert dc.main(["--check", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n") and text.endswith(f"{dc.END}\n\n## Tests\n")


def test_missing_markers_fail_clearly(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        dc.main(["--write", "--readme", str(readme)])
