"""One omni app per test session, started the way users start it: ``serve run serve_config.yaml``.

The test process owns a local Ray cluster (the session's ``ray_session``; gone when pytest exits); the CLI runs
in a subprocess against that cluster with a copy of serve_config.yaml whose HTTP port is free.
Tests talk HTTP to it and use ``serve.get_app_handle`` from this process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 420


def app_config() -> dict:
    """The OmniConfig dict of the default app in serve_config.yaml."""
    doc = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    return doc["applications"][0]["args"]["config"]


@pytest.fixture(scope="session")
def ray_cluster(ray_session):
    """The session's local Ray cluster (tests/conftest.py); yields its GCS address."""
    return ray_session


@pytest.fixture(scope="session")
def omni_url(ray_cluster, tmp_path_factory):
    """``serve run`` on serve_config.yaml (port changed); yields the base URL once /health is ok."""
    import httpx
    from ray import serve

    doc = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    port = free_port()
    doc["http_options"]["port"] = port
    tmp = tmp_path_factory.mktemp("serve")
    cfg_path = tmp / "serve_config.yaml"
    cfg_path.write_text(yaml.safe_dump(doc))
    log = open(tmp / "serve_run.log", "w")
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    serve_cli = [shutil.which("serve")] if shutil.which("serve") else [sys.executable, "-m", "ray.serve.scripts"]
    proc = subprocess.Popen(serve_cli + ["run", str(cfg_path),
                             "--address", ray_cluster], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                log = (tmp / 'serve_run.log').read_text()[-4000:]
                raise RuntimeError(f"serve run exited with {proc.returncode}:\n{log}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"omni app not healthy after {STARTUP_TIMEOUT_S}s:\n"
                                   f"{(tmp / 'serve_run.log').read_text()[-4000:]}")
            time.sleep(0.25)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)          # serve run shuts Serve down on Ctrl-C
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        try:
            serve.shutdown()
        except Exception:
            pass


@pytest.fixture(scope="session")
def client(omni_url):
    import httpx

    with httpx.Client(base_url=omni_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def omni_handle(omni_url):
    from ray import serve

    return serve.get_app_handle("omni")
