"""Strict offline checks for the manifests and serve configs, unknown keys rejected.

* KubeRay objects against the CRDs' OpenAPI v3 schemas, with ``additionalProperties: false``
  added to every object schema that names its properties (Kubernetes' strict mode).
* Serve configs against Ray Serve's ``ServeDeploySchema``, first walking the dict against
  the pydantic fields (Ray drops unknown keys silently), then each application's
  ``args.config`` as an ``OmniConfig``.
"""

from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from pydantic import BaseModel

from omni_ray.config import OmniConfig, load_config

_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf")


# ----------------------------------------------------------------------------- KubeRay CRDs
def forbid_unknown(schema: dict) -> dict:
    """Set ``additionalProperties: false`` wherever ``properties`` are listed without it."""
    if not isinstance(schema, dict):
        return schema
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    for sub in schema.get("properties", {}).values():
        forbid_unknown(sub)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            forbid_unknown(schema[key])
    for key in _SUBSCHEMA_LISTS:
        for sub in schema.get(key, []):
            forbid_unknown(sub)
    return schema


def crd_schema(crd_file: str | Path, version: str = "v1") -> dict:
    crd = yaml.safe_load(Path(crd_file).read_text())
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return forbid_unknown(copy.deepcopy(ver["schema"]["openAPIV3Schema"]))


def crd_errors(manifest: dict, schema: dict) -> list[str]:
    """Every schema violation as ``path.to.field: message`` (empty when valid)."""
    validator = jsonschema.Draft202012Validator(schema)
    errs = sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errs]


# ----------------------------------------------------------------------------- Ray Serve
def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside ``Optional[List[Model]]``, ``Union[Dict, Model]``..."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _fields(model: type[BaseModel]) -> dict[str, Any]:
    out = {}
    for name, f in model.model_fields.items():
        out[name] = f.annotation
        if f.alias:
            out[f.alias] = f.annotation
    return out


def unknown_keys(data: Any, model: type[BaseModel], path: str = "") -> list[str]:
    """Keys of ``data`` (recursively) that ``model`` does not define. Free-form dict fields
    (``args``, ``runtime_env``, ``user_config``) are not walked."""
    if not isinstance(data, dict):
        return []
    fields, bad = _fields(model), []
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            bad.append(where)
            continue
        models = _models_in(fields[key])
        if not models:
            continue
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            sub = f"{where}.{i}" if isinstance(value, list) else where
            bad += unknown_keys(item, models[0], sub)
    return bad


def validate_serve_config(doc: dict) -> list[OmniConfig]:
    """Check a Serve config strictly; returns each application's OmniConfig.
    Raises ``ValueError`` (unknown keys), pydantic ``ValidationError`` or ``ConfigError``."""
    from ray.serve.schema import ServeDeploySchema

    bad = unknown_keys(doc, ServeDeploySchema)
    if bad:
        raise ValueError(f"unknown Serve config keys: {bad}")
    ServeDeploySchema.model_validate(doc)
    configs = []
    for app in doc["applications"]:
        if "config" not in app.get("args", {}):
            raise ValueError(f"application {app.get('name')!r}: args.config (an OmniConfig) is missing")
        configs.append(load_config(app["args"]["config"]))
    return configs
