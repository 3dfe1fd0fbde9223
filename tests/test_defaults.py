"""One source of defaults: params.yaml names every knob of the schema (pipelines/params/), each at the schema's default.

A default that differs between params.yaml and the schema means two answers to "what does the pipeline do by
default": a run with params.yaml does one thing, a section left out of a params file (tests, experiments, a user's own
file) silently does another. So params.yaml must be complete (every field of every section, nested sections included;
lists and free-form mappings such as `eval_scores.models` count as one value) and equal to the defaults, compared
after validation (5.0e-05 and 5e-05 are the same learning rate). The last two tests show each rule failing by key.
"""
from __future__ import annotations

import copy
from typing import Any, Iterator, List, Mapping, Tuple, Type

import pytest
import yaml
from pydantic import BaseModel

from conftest import ROOT
from pipelines.params import Params, RawCotsParams
from pipelines.params.common import PositiveInt


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the schema checks that paths.spec and paths.prompts exist, relative to the project


def params_yaml() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def schema_defaults(model: Type[BaseModel], data: Mapping[str, Any]) -> dict:
    """The schema's defaults for `model`, taking only its required fields (those without a default) from `data`."""
    required = {n: data[n] for n, f in model.model_fields.items() if f.is_required() and n in data}
    return model.model_validate(required).model_dump(mode="json")


def _diff(got: Any, want: Any, key: str) -> Iterator[Tuple[str, Any, Any]]:
    if isinstance(got, dict) and isinstance(want, dict):
        for k in list(got) + [k for k in want if k not in got]:
            yield from _diff(got.get(k), want.get(k), f"{key}.{k}" if key else k)
    elif isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        for i, (a, b) in enumerate(zip(got, want)):
            yield from _diff(a, b, f"{key}[{i}]")
    elif got != want:
        yield key, got, want


def disagreements(model: Type[BaseModel], data: Mapping[str, Any], prefix: str = "") -> List[Tuple[str, Any, Any]]:
    """(dotted key, value in data, schema default) of every validated value of `data` that is not the default."""
    got = model.model_validate(data).model_dump(mode="json")
    return list(_diff(got, schema_defaults(model, data), prefix))


def missing_keys(model: Type[BaseModel], data: Mapping[str, Any], prefix: str = "") -> List[str]:
    """Dotted keys of schema fields that `data` leaves out, recursing into every nested section it gives as a mapping
    (with the class that mapping validates to, so a backend's fields are those of its `kind`)."""
    return list(_missing(model.model_validate(data), data, prefix))


def _missing(obj: BaseModel, data: Mapping[str, Any], prefix: str) -> Iterator[str]:
    for name in type(obj).model_fields:
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            yield key
        elif isinstance(getattr(obj, name), BaseModel) and isinstance(data[name], dict):
            yield from _missing(getattr(obj, name), data[name], key)


def test_params_yaml_names_every_schema_field():
    missing = missing_keys(Params, params_yaml())
    assert not missing, "params.yaml lacks schema fields (add them with their default):\n" + "\n".join(missing)


def test_params_yaml_equals_the_schema_defaults():
    diff = disagreements(Params, params_yaml())
    assert not diff, "params.yaml and the schema (pipelines/params/) disagree:\n" + "\n".join(
        f"{k}: params.yaml {a!r}, schema {b!r}" for k, a, b in diff)


# The two tests below compare with what the real params.yaml already gives, so they show the checks at work whether
# or not the file is clean at the moment.
def _keys(diff: List[Tuple[str, Any, Any]]) -> set:
    return {k for k, _, _ in diff}


def test_a_changed_schema_default_is_reported_by_key():
    class Drifted(RawCotsParams):  # the schema with one default moved away from params.yaml's value
        n_samples: PositiveInt = params_yaml()["raw_cots"]["n_samples"] + 1

    section = params_yaml()["raw_cots"]
    before = _keys(disagreements(RawCotsParams, section, "raw_cots"))
    assert _keys(disagreements(Drifted, section, "raw_cots")) - before == {"raw_cots.n_samples"}
    # and the other way round: values edited in a copy of params.yaml, one deep inside a list of sections
    data = copy.deepcopy(params_yaml())
    data["judge_calibration"]["judges"][0]["threshold"] = 5.0
    data["eval_scores"]["sampling"]["max_new_tokens"] += 1
    assert _keys(disagreements(Params, data)) - _keys(disagreements(Params, params_yaml())) == {
        "eval_scores.sampling.max_new_tokens", "judge_calibration.judges[0].threshold"}


def test_a_field_left_out_of_params_yaml_is_reported_by_key():
    data = copy.deepcopy(params_yaml())
    del data["eval_scores"]["sampling"]["seed"]
    del data["raw_cots"]["generator"]["dtype"]
    del data["report"]
    before = missing_keys(Params, params_yaml())
    assert [k for k in missing_keys(Params, data) if k not in before] == [
        "raw_cots.generator.dtype", "eval_scores.sampling.seed", "report"]
