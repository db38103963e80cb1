"""The one YAML reader and validation-error formatter every stage's config uses."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from perpair.config_files import format_validation_error, load_yaml
from perpair.errors import InputError


def test_load_yaml_reads_a_mapping_and_an_empty_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: 1\nb: {c: [1, 2]}\n")
    assert load_yaml(path, "run config") == {"a": 1, "b": {"c": [1, 2]}}
    path.write_text("# nothing set\n")
    assert load_yaml(path, "run config") == {}


@pytest.mark.parametrize(("content", "words"), [
    (None, "no such run config file"),
    ("a: 1\nb: [unclosed\n", "not valid YAML at line 3"),
    ("a: 1\n  b: 2\n", "not valid YAML at line 2, column 4"),
    ("- 1\n- 2\n", "must be a mapping of keys to values, got a list"),
    (b"a: \xff\n", "not valid UTF-8"),
    ("folder", "is a folder"),
])
def test_load_yaml_names_the_file_and_the_problem(tmp_path, content, words):
    path = tmp_path / "my.yaml"
    if content == "folder":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(InputError) as caught:
        load_yaml(path, "run config")
    assert str(caught.value).startswith(f"file {path}: ") and words in str(caught.value)


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate: float = Field(0.1, gt=0)


class _Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    inner: _Inner = _Inner()
    low: int = 0
    high: int = 1

    @model_validator(mode="after")
    def _order(self) -> _Outer:
        if self.low >= self.high:
            raise ValueError("low must be smaller than high")
        return self


def _problems(data: dict, prefix: str = "") -> str:
    with pytest.raises(ValidationError) as caught:
        _Outer.model_validate(data)
    return format_validation_error(caught.value, prefix)


def test_every_problem_is_named_by_its_dotted_key():
    text = _problems({"inner": {"rate": -1, "colour": "red"}})
    assert text.split("; ") == ["name: Field required", "inner.rate: Input should be greater than 0 (got -1)",
                                "unknown key 'inner.colour'"]
    assert _problems({"name": "x", "low": 3}) == "low must be smaller than high"  # a cross-field rule
    assert _problems({"name": "x", "inner": {"rate": 0}}, "arms.dpo") == (
        "arms.dpo.inner.rate: Input should be greater than 0 (got 0)")
    long = _problems({"name": "x", "low": "y" * 200})  # a long value is cut, so the line stays readable
    assert long.startswith("low: Input should be a valid integer") and long.endswith("yyy…)") and len(long) < 200
