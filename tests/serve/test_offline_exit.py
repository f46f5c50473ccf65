"""The offline ``OmniLLM`` shuts its engines down cleanly: the README's example exits without a
traceback or a pending task, and a shut-down OmniLLM says so."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from omni_ray import OmniLLM
from omni_ray.errors import EngineError
from tests.serve.conftest import app_config

ROOT = Path(__file__).resolve().parents[2]


def readme_omnillm_example() -> str:
    """The README's ``OmniLLM`` example, as written there."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    ours = [b for b in blocks if "OmniLLM(\"serve_config.yaml\")" in b]
    assert len(ours) == 1, "the README has one OmniLLM(\"serve_config.yaml\") example"
    return ours[0]


def run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("ending", ["", "omni.shutdown()\n", "del omni\nimport gc; gc.collect()\n"])
def test_readme_example_exits_cleanly(ending):
    """Left to the interpreter's exit, shut down by hand, or garbage-collected: no traceback, no
    "Task was destroyed but it is pending!", exit status 0."""
    code = readme_omnillm_example() + "print('images', len(out[0].images))\n" + ending
    proc = run(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "images 1" in proc.stdout
    for bad in ("Traceback", "Task was destroyed", "GeneratorExit", "loop died", "Exception ignored"):
        assert bad not in proc.stderr, proc.stderr[-3000:]


def test_shutdown_is_idempotent_and_final():
    omni = OmniLLM(app_config())
    out = omni.generate("chat", "hi", max_tokens=2, use_tqdm=False)
    assert out.usage["completion_tokens"] <= 2
    with omni:                                         # a context manager too
        pass
    omni.shutdown()                                    # again: nothing to do
    with pytest.raises(EngineError, match="shut down"):
        omni.generate("chat", "hi", max_tokens=2, use_tqdm=False)
