"""``omni-ray`` (omni_ray/cli.py): offline generation from a config, tiny checkpoints, benchmarks
pass-through, docs, config validation; bad input exits 2 with one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from PIL import Image

from omni_ray.cli import main, parse_cache

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "serve_config.yaml")


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_entry_point_is_declared():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["omni-ray"] == "omni_ray.cli:main"


def test_generate_text_on_a_stage(capsys):
    rc, out, _ = run(capsys, "generate", "--config", CONFIG, "--stage", "llm", "--prompt", "Hello",
                     "--prompt", "The lighthouse", "--max-tokens", "5", "--seed", "0", "--json", "--quiet")
    assert rc == 0
    body = json.loads(out)
    assert [o["prompt"] for o in body["outputs"]] == ["Hello", "The lighthouse"]
    for o in body["outputs"]:
        assert isinstance(o["text"], str)
        assert 1 <= o["usage"]["completion_tokens"] <= 5
        assert [s["stage"] for s in o["stages"]] == ["llm"]
    assert body["images"] == []
    # the same seed gives the same text
    rc, again, _ = run(capsys, "generate", "--config", CONFIG, "--prompt", "Hello", "--max-tokens", "5",
                       "--seed", "0", "--json", "--quiet")
    assert json.loads(again)["outputs"][0]["text"] == body["outputs"][0]["text"]


def test_image_writes_pngs(capsys, tmp_path):
    rc, out, _ = run(capsys, "image", "--config", CONFIG, "--prompt", "a red fox", "--size", "64x32",
                     "--steps", "2", "--n", "2", "--seed", "1", "--out", str(tmp_path), "--quiet")
    assert rc == 0
    paths = [Path(p) for p in out.split()]
    assert len(paths) == 2 and all(p.parent == tmp_path for p in paths)
    assert [Image.open(p).size for p in paths] == [(64, 32), (64, 32)]


def test_pipeline_with_text_and_images(capsys, tmp_path):
    rc, out, _ = run(capsys, "generate", "--config", CONFIG, "--pipeline", "text2image", "--prompt", "a fox",
                     "--max-tokens", "4", "--size", "64x64", "--steps", "2", "--out", str(tmp_path), "--json",
                     "--quiet")
    assert rc == 0
    body = json.loads(out)
    assert [s["stage"] for s in body["outputs"][0]["stages"]] == ["llm", "image"]
    assert len(body["images"]) == 1 and Path(body["images"][0]).exists()


@pytest.mark.parametrize("argv, needle", [
    (["generate", "--stage", "nope", "--prompt", "x"], "unknown stage 'nope'"),
    (["generate", "--pipeline", "nope", "--prompt", "x"], "unknown pipeline 'nope'"),
    (["generate", "--stage", "llm", "--pipeline", "chat", "--prompt", "x"], "not both"),
    (["image", "--prompt", "x", "--size", "big"], "size"),
    (["image", "--prompt", "x", "--cache", "teacache:lots"], "threshold"),
    (["generate", "--config", "missing.yaml", "--prompt", "x"], "not found"),
])
def test_bad_input_exits_2_with_one_line(capsys, argv, needle):
    if "--config" not in argv:
        argv = argv[:1] + ["--config", CONFIG] + argv[1:]
    rc, out, err = run(capsys, *argv, "--quiet")
    assert rc == 2 and out == ""
    assert needle in err and err.count("\n") == 1


def test_parse_cache():
    assert parse_cache("teacache:0.3") == {"method": "teacache", "threshold": 0.3}
    assert parse_cache("fbcache") == {"method": "fbcache"}
    assert parse_cache(None) is None


def test_make_tiny(capsys):
    rc, out, _ = run(capsys, "make-tiny", "--list")
    assert rc == 0 and {"tiny:qwen3", "tiny:pixart"} <= set(out.split())
    rc, out, _ = run(capsys, "make-tiny", "tiny:qwen3")
    name, path = out.strip().split("\t")
    assert rc == 0 and name == "tiny:qwen3" and (Path(path) / "config.json").exists()
    rc, _, err = run(capsys, "make-tiny", "tiny:nope")
    assert rc == 2 and "unknown built-in model" in err


def test_validate_lists_stages_and_pipelines(capsys):
    rc, out, _ = run(capsys, "validate", str(ROOT / "serve_config.gpu.yaml"))
    assert rc == 0 and "stage llm: ar" in out and "pipeline text2image: llm[prompt->text] -> image" in out


def test_docs_check_passes_on_the_repository(capsys):
    rc, out, _ = run(capsys, "docs", "--check")
    assert rc == 0, "README configuration reference is stale: run `omni-ray docs --write`"


def test_bench_passes_arguments_through():
    """``omni-ray bench scheduler --help`` runs benchmarks/bench_scheduler.py with ``--help``."""
    r = subprocess.run([sys.executable, "-m", "omni_ray.cli", "bench", "scheduler", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "bench_scheduler" in r.stdout
