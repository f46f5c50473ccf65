"""Fuzzing the HTTP API with schemathesis, from the app's own OpenAPI document.

Every operation gets valid and invalid inputs (schemathesis' coverage and fuzzing phases, a
bounded number of examples each); every response must be a documented status (never a 5xx
other than the documented 503/504, never 500) with a documented body, and no replica of the app
may crash or restart. The guarded app's tight limits keep valid generations cheap on a CPU; its
document states them as schema bounds (deployments/ingress/openapi_doc.py), so generated input also gets
through to the engines on every generating route (checked: at least one 200 on each).
"""

from __future__ import annotations

import os
import time
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.reliability.conftest import API_KEY, replica_ids, wait_until

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MAX_EXAMPLES = int(os.environ.get("OMNI_FUZZ_EXAMPLES", 25))   # per operation and phase: bounds the run
KEYED = {"Authorization": f"Bearer {API_KEY}"}
SEEN: dict = {"codes": Counter()}


@pytest.fixture(scope="module")
def api_schema(guard):
    SEEN["replicas_before"] = replica_ids(guard.name)
    s = schemathesis.openapi.from_url(guard.url + "/openapi.json", headers=KEYED)
    s.config.update(base_url=guard.url)
    return s


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=os.environ.get("OMNI_FUZZ_RANDOM") is None,
          database=None,
          suppress_health_check=list(HealthCheck))
def test_api_never_fails_on_generated_input(case):
    response = case.call(headers=KEYED, timeout=120)
    SEEN["codes"][(f"{case.method} {case.path}", response.status_code)] += 1
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                             response_schema_conformance, negative_data_rejection])


def test_no_replica_crashed_and_engines_are_idle(guard):
    """Runs after the fuzzing: the same replicas are up and every engine has let go of every request."""
    assert "replicas_before" in SEEN, "the fuzz test did not run first"
    codes = SEEN["codes"]
    print(f"\nfuzzed {sum(codes.values())} requests: " + ", ".join(
        f"{op} {code}: {n}" for (op, code), n in sorted(codes.items())))
    assert replica_ids(guard.name) == SEEN["replicas_before"]
    # the document's bounds (the app's limits, its pipeline names) let generated input through to the
    # engines on every generating route, not only into the 400s
    for op in ("POST /v1/completions", "POST /v1/chat/completions", "POST /v1/images/generations",
               "POST /v1/pipelines/{name}"):
        assert codes[(op, 200)] > 0, f"no generated request to {op} was served"
    assert httpx.get(guard.url + "/health", timeout=30).status_code == 200

    def idle():
        s = guard.stats(KEYED)
        llm = s["llm"]
        return (llm["num_running"] + llm["num_waiting"] + llm["num_streams"] == 0
                and llm["num_free_blocks"] == llm["num_blocks"]
                and all(s[k]["active_requests"] + s[k]["waiting_requests"] + s[k]["num_streams"] == 0
                        for k in ("image", "image-llm")))

    t0 = time.monotonic()
    wait_until(idle, 60, "engines idle after the fuzzing")
    print(f"engines idle {time.monotonic() - t0:.1f}s after the fuzzing")
