"""The JSON schema of ``mixprec demo``'s report.json, and a validator for it (no dependency).

:data:`REPORT_SCHEMA` is a JSON Schema draft 2020-12 document; :func:`validate_report`
implements the subset of keywords it uses, plus the checks a schema cannot express.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from mixprec.schema import SCHEMA_VERSION

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_FRACTION = {"type": "number", "minimum": 0, "maximum": 1}
_INT0 = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}


def _obj(
    props: dict[str, Any], required: Sequence[str] | None = None, extra: bool = False
) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props if required is None else required),
        "additionalProperties": extra,
    }


def _curve(value_schema: dict[str, Any]) -> dict[str, Any]:
    return _obj(
        {
            "step": {"type": "array", "items": _INT0},
            "value": {"type": "array", "items": value_schema},
        }
    )


_RECIPE = _obj(
    {
        "id": _STR,
        "label": _STR,
        "compute_format": _STR,
        "output_format": _STR,
        "grad_format": _STR,
        "master_weights": {"type": "boolean"},
        "loss_scale": {"enum": ["none", "dynamic"]},
        "per_tensor_scaling": {"type": "boolean"},
        "shows": _STR,
    }
)

_PROBE = _obj(
    {
        "step": _INT0,
        "loss_scale": _NUM,
        "act_flushed": _FRACTION,
        "weight_flushed": _FRACTION,
        "act_flushed_unscaled": _FRACTION,
        "weight_flushed_unscaled": _FRACTION,
    }
)

_RUN = _obj(
    {
        "recipe": _RECIPE,
        "metric": {"enum": ["accuracy", "perplexity"]},
        "final_train_loss": _NUM_OR_NULL,
        "val_metric": _NUM_OR_NULL,
        "delta_vs_fp32": _NUM_OR_NULL,
        "diverged": {"type": "boolean"},
        "steps": {"type": "integer", "minimum": 1},
        "steps_skipped": {"type": "number", "minimum": 0},  # mean over seeds
        "final_loss_scale": {"type": "number", "exclusiveMinimum": 0},
        "act_grads_flushed": _FRACTION,
        "weight_grads_flushed": _FRACTION,
        "updates_lost": _FRACTION,
        "wall_time_s": {"type": "number", "minimum": 0},
        "backend": _STR,
        "curves": _obj(
            {
                "train_loss": _curve(_NUM_OR_NULL),
                "val_metric": _curve(_NUM_OR_NULL),
                "loss_scale": _curve(_NUM),
            }
        ),
        "probes": {"type": "array", "items": _PROBE, "minItems": 1},
        "per_seed": _obj(
            {
                "seed": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
                "final_train_loss": {"type": "array", "items": _NUM_OR_NULL, "minItems": 1},
                "val_metric": {"type": "array", "items": _NUM_OR_NULL, "minItems": 1},
            }
        ),
        "grad_histogram": _obj(
            {
                "log2_edges": {"type": "array", "items": {"type": "integer"}, "minItems": 2},
                "activation": {"type": "array", "items": _INT0},
                "weight": {"type": "array", "items": _INT0},
            }
        ),
    },
    required=[
        "recipe", "metric", "final_train_loss", "val_metric", "delta_vs_fp32", "diverged",
        "steps", "steps_skipped", "final_loss_scale", "act_grads_flushed",
        "weight_grads_flushed", "updates_lost", "wall_time_s", "backend", "curves", "probes",
        "per_seed",
    ],
)  # fmt: skip

_FINDING = _obj(
    {
        "id": _STR,
        "claim": _STR,
        "holds": {"type": ["boolean", "null"]},
        "detail": _STR,
    }
)

_TASK = _obj(
    {
        "name": {"enum": ["digits", "text"]},
        "metric": {"enum": ["accuracy", "perplexity"]},
        "metric_unit": _STR,
        "higher_is_better": {"type": "boolean"},
        "dataset": {"type": "object", "required": ["name", "n_train", "n_val", "sha256"]},
        "model": {"type": "object", "required": ["kind", "parameters"]},
        "training": {"type": "object", "required": ["steps", "batch_size", "lr", "optimizer"]},
        "runs": {"type": "array", "items": _RUN, "minItems": 1},
        "findings": {"type": "array", "items": _FINDING},
        "summary": _STR,
    }
)

_ENV = {
    "type": "object",
    "required": [
        "python", "platform", "machine", "torch", "numpy", "mixprec", "cpu_capability",
        "torch_threads", "cpu_count", "c_kernel", "device", "deterministic_algorithms",
    ],
    "additionalProperties": True,
}  # fmt: skip

REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "mixprec demo report",
    **_obj(
        {
            "schema_version": {"const": SCHEMA_VERSION},
            "tool": {"const": "mixprec demo"},
            "preset": _STR,
            "config": {"type": "object", "required": ["seed", "recipes", "tasks", "threads"]},
            "environment": _ENV,
            "tasks": {"type": "array", "items": _TASK, "minItems": 1},
            "wall_time_s": {"type": "number", "minimum": 0},
            "created_utc": _STR,
        }
    ),
}

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list, tuple),
    "string": (str,),
    "boolean": (bool,),
    "null": (type(None),),
}


def _type_ok(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)  # JSON has no NaN/inf; a report never contains them
        )
    return isinstance(value, _TYPES[name])


def _validate(value: Any, schema: Mapping[str, Any], path: str, errors: list[str]) -> None:
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_type_ok(value, n) for n in names):
            errors.append(f"{path}: expected {' or '.join(names)}, got {value!r:.60}")
            return
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: expected {schema['const']!r}, got {value!r:.60}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r:.60} is not one of {schema['enum']}")
    if _type_ok(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} > maximum {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(f"{path}: {value} <= exclusive minimum {schema['exclusiveMinimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                errors.append(f"{path}: missing required key {key!r}")
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                _validate(item, props[key], f"{path}.{key}", errors)
            elif schema.get("additionalProperties", True) is False:
                errors.append(f"{path}: unexpected key {key!r}")
    if isinstance(value, list | tuple):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: needs at least {schema['minItems']} items, has {len(value)}")
        if "items" in schema:
            for i, item in enumerate(value):
                _validate(item, schema["items"], f"{path}[{i}]", errors)


def validate_report(doc: Any, schema: Mapping[str, Any] | None = None) -> None:
    """Check a demo report against :data:`REPORT_SCHEMA`; raise ``ValueError`` listing problems.

    Implements the JSON Schema keywords the schema uses (type, const, enum, minimum, maximum,
    exclusiveMinimum, properties, required, additionalProperties, items, minItems); numbers must
    be finite. Also checks what a schema cannot say: every task has the fp32 baseline first,
    curves' step and value arrays have equal lengths, and the schema version is the one this
    code writes.
    """
    errors: list[str] = []
    _validate(doc, REPORT_SCHEMA if schema is None else schema, "$", errors)
    if not errors:
        for ti, task in enumerate(doc["tasks"]):
            runs = task["runs"]
            if runs[0]["recipe"]["id"] != "fp32":
                errors.append(f"$.tasks[{ti}].runs[0]: the fp32 baseline must come first")
            for ri, run in enumerate(runs):
                if run["metric"] != task["metric"]:
                    errors.append(f"$.tasks[{ti}].runs[{ri}].metric differs from the task's")
                for name, curve in run["curves"].items():
                    if len(curve["step"]) != len(curve["value"]):
                        errors.append(
                            f"$.tasks[{ti}].runs[{ri}].curves.{name}: step and value lengths "
                            f"differ ({len(curve['step'])} vs {len(curve['value'])})"
                        )
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(f"report does not match schema {SCHEMA_VERSION}:\n  {shown}{more}")
