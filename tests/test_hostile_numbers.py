"""Class 3 of issue 21: unbounded numbers and coerced types in params.yaml.

Promise: every numeric key of the schema (found by walking the pydantic models, every backend variant included)
refuses inf, -inf, nan, huge values (10**10 .. 10**40, 2**63, 1e300), large negatives, numbers written as strings
and booleans, with one line naming the dotted key. Before: inf passed wherever a float had only a lower bound,
10**20 samples ran away, a seed beyond numpy's range failed only when training started, "3" became 3.
"""
from __future__ import annotations

import copy
import random
import typing
from typing import Any, Iterator, List, Tuple

import pytest
from pydantic import BaseModel

from pipelines.errors import PipelineError
from pipelines.params import Params, parse_params
from pipelines.params.common import FakeBackend, OpenAIBackend, TransformersBackend
from test_hostile_common import make_project, minimal_params, refused, run_cli, snapshot

# Keys of files this change does not own that still lack an upper bound; each needs the one-line change named in
# RELIABILITY.md (class 3). Finite values above the bound are then refused there too; inf/nan already are.
OPEN_ABOVE: set = set()

VARIANTS = {
    "transformers": TransformersBackend(kind="transformers").model_dump(),
    "openai": OpenAIBackend(kind="openai", base_url="http://127.0.0.1:9/v1", model="m").model_dump(),
    "fake": FakeBackend(kind="fake").model_dump(),
}


def _core(annotation) -> List[Any]:
    """The non-None types an annotation allows (Optional/Union unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "types.UnionType":
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def numeric_keys(model: type, data: dict, path: Tuple[Any, ...] = ()) -> Iterator[Tuple[Tuple[Any, ...], dict, type]]:
    """(path, document to put the bad value in, int|float) for every numeric leaf reachable from `data`."""
    for name, field in model.model_fields.items():
        here = path + (name,)
        for t in _core(field.annotation):
            origin = typing.get_origin(t)
            if t in (int, float):
                yield here, data, t
            elif isinstance(t, type) and issubclass(t, BaseModel):
                kinds = typing.get_args(t.model_fields["kind"].annotation) if "kind" in t.model_fields else ()
                if len(kinds) == 1 and kinds[0] in VARIANTS:
                    # a backend variant: put that variant in place, then walk it
                    kind = kinds[0]
                    doc = copy.deepcopy(data)
                    _set(doc, here, copy.deepcopy(VARIANTS[kind]))
                    yield from numeric_keys(t, doc, here)
                elif _get(data, here) is not None:
                    yield from numeric_keys(t, data, here)
            elif origin in (list, List) and typing.get_args(t):
                inner = _core(typing.get_args(t)[0])[0]
                value = _get(data, here)
                if inner in (int, float) and value:
                    yield here + (0,), data, inner
                elif isinstance(inner, type) and issubclass(inner, BaseModel) and value:
                    yield from numeric_keys(inner, data, here + (0,))


def _get(doc, path):
    for p in path:
        try:
            doc = doc[p]
        except (KeyError, IndexError, TypeError):
            return None
    return doc


def _set(doc, path, value):
    for p in path[:-1]:
        doc = doc[p]
    doc[path[-1]] = value


def bad_values(kind: type, rng: random.Random) -> List[Any]:
    values = [float("inf"), float("-inf"), float("nan"), -10 ** 20, rng.choice(["3", "0.5", "1e3", " 7", "inf", "nan"]),
              rng.choice([True, False])]
    values += [10 ** rng.randint(10, 40), rng.choice([2 ** 63, 2 ** 64 + 1, 2 ** 32])]  # seeds allow up to 2**31-1
    if kind is float:
        values.append(rng.choice([1e7, 1e12, 1e300]))
    return values


def dotted(path) -> str:
    return ".".join(str(p) for p in path)


def test_every_numeric_key_refuses_inf_nan_huge_strings_and_bools(tmp_path):
    project = make_project(tmp_path / "p")
    base = Params(categories=["violence"], paths={"spec": str(project / "data/spec"),
                                                  "prompts": str(project / "data/prompts")}).model_dump(mode="python")
    rng = random.Random(0)
    leaves = list(numeric_keys(Params, base))
    keys = {dotted(p) for p, _, _ in leaves}
    # the walk reaches every section and every backend variant
    for must in ("raw_cots.sampling.temperature", "raw_cots.n_samples", "raw_cots.sampling.seed",
                 "raw_cots.generator.timeout_s", "raw_cots.generator.delay_s", "sft_checkpoint.learning_rate",
                 "rl_checkpoint.seed", "judged_cots.judge.k", "eval_scores.endpoint.timeout_s", "report.dpi"):
        assert must in keys, sorted(keys)
    tried = 0
    for path, doc, kind in leaves:
        key = dotted(path)
        for value in bad_values(kind, rng):
            finite_big = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
                and value > 0 and value != float("inf")
            if key in OPEN_ABOVE and finite_big:
                continue
            bad = copy.deepcopy(doc)
            _set(bad, path, value)
            with pytest.raises(PipelineError) as e:
                parse_params(bad)
            msg = str(e.value)
            assert "\n" not in msg
            shown = ".".join(str(p) for p in path if p not in ("transformers", "openai", "fake"))
            assert shown in msg, (key, value, msg)
            tried += 1
    assert len(leaves) >= 60 and tried >= 500, (len(leaves), tried)


def test_the_issue_examples_via_cli_write_nothing(tmp_path):
    project = make_project(tmp_path / "p")
    import yaml
    cases = [
        ({"raw_cots": {**minimal_params()["raw_cots"], "n_samples": 10 ** 20}}, "raw_cots.n_samples"),
        ({"raw_cots": {**minimal_params()["raw_cots"], "sampling": {"temperature": float("inf")}}},
         "raw_cots.sampling.temperature"),
        ({"sft_checkpoint": {"learning_rate": float("inf")}}, "sft_checkpoint.learning_rate"),
        ({"sft_checkpoint": {"seed": 2 ** 40}}, "sft_checkpoint.seed"),
        ({"raw_cots": {**minimal_params()["raw_cots"], "shard_size": "3"}}, "raw_cots.shard_size"),
    ]
    for section, key in cases:
        (project / "params.yaml").write_text(yaml.safe_dump(minimal_params(**section)))
        before = snapshot(project)
        refused(run_cli("spec_chunks", "--category", "violence", project=project), "params.yaml", key)
        assert snapshot(project) == before


def test_good_values_still_load(tmp_path):
    """The bounds leave room: ints where floats go, the largest allowed seed and counts."""
    project = make_project(tmp_path / "p")
    p = minimal_params(sft_checkpoint={"learning_rate": 1, "seed": 2 ** 31 - 1, "epochs": 3},
                       paths={"spec": str(project / "data/spec"), "prompts": str(project / "data/prompts")})
    p["raw_cots"].update(n_samples=64, sampling={"temperature": 2, "max_new_tokens": 32768, "seed": 123})
    params = parse_params(p)
    assert params.sft_checkpoint.learning_rate == 1.0 and params.raw_cots.sampling.temperature == 2.0
