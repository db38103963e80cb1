"""The one YAML reader and validation-error formatter every stage's config uses."""

from __future__ import annotations

import re

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from perpair.config_files import format_validation_error, load_yaml
from perpair.errors import InputError, PerpairError


def test_load_yaml_reads_a_mapping_and_an_empty_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: 1\nb: {c: [1, 2]}\n")
    assert load_yaml(path, "run config") == {"a": 1, "b": {"c": [1, 2]}}
    path.write_text("# nothing set\n")
    assert load_yaml(path, "run config") == {}
    # the same key in two mappings is no duplicate, nor is a key a merge brings in and the mapping overrides
    path.write_text("a: {k: 1}\nb: {k: 2}\nbase: &base {lr: 1, r: 8}\narm:\n  <<: *base\n  lr: 2\n")
    assert load_yaml(path, "run config") == {"a": {"k": 1}, "b": {"k": 2}, "base": {"lr": 1, "r": 8},
                                             "arm": {"lr": 2, "r": 8}}


@pytest.mark.parametrize(("content", "words"), [
    (None, "no such run config file"),
    ("a: 1\nb: [unclosed\n", "not valid YAML at line 3"),
    ("a: 1\n  b: 2\n", "not valid YAML at line 2, column 4"),
    ("- 1\n- 2\n", "must be a mapping of keys to values, got a list"),
    (b"a: \xff\n", "not valid UTF-8"),
    ("folder", "is a folder"),
    # PyYAML keeps the last of a key written twice: a setting appended below the original would silently win
    ("workdir: a\nworkdir: b\n", "has the key 'workdir' twice in one mapping, at lines 1 and 2"),
    ("data:\n  limit: 3\n  seed: 0\n  limit: 4\n", "has the key 'limit' twice in one mapping, at lines 2 and 4"),
    ("arms: {dpo: {preset: dpo}, dpo: {preset: sp2dpo}}\n", "has the key 'dpo' twice"),
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


def _problems(data: dict, prefix: str = "", command_line: dict | None = None) -> str:
    with pytest.raises(ValidationError) as caught:
        _Outer.model_validate(data)
    return format_validation_error(caught.value, prefix, command_line)


def test_every_problem_is_named_by_its_dotted_key():
    text = _problems({"inner": {"rate": -1, "colour": "red"}})
    assert text.split("; ") == ["name: Field required", "inner.rate: Input should be greater than 0 (got -1)",
                                "unknown key 'inner.colour'"]
    assert _problems({"name": "x", "low": 3}) == "low must be smaller than high"  # a cross-field rule
    assert _problems({"name": "x", "inner": {"rate": 0}}, "arms.dpo") == (
        "arms.dpo.inner.rate: Input should be greater than 0 (got 0)")
    long = _problems({"name": "x", "low": "y" * 200})  # a long value is cut, so the line stays readable
    assert long.startswith("low: Input should be a valid integer") and long.endswith("yyy…)") and len(long) < 200


def test_a_value_from_the_command_line_is_not_blamed_on_the_file(tmp_path):
    """Keys set by ``--set`` or an option say so; the file is named only when a refused key is not among them
    (a train config and a run config, as their commands read them)."""
    from perpair.pipeline.config import load_run_config
    from perpair.train.config import load_config

    text = _problems({"name": "x", "inner": {"rate": 0, "colour": "red"}},
                     command_line={"inner": {"colour": "red"}})
    assert text.split("; ") == ["inner.rate: Input should be greater than 0 (got 0)",
                                "unknown key 'inner.colour' (from the command line)"]
    assert _problems({"name": "x", "low": 3}, command_line={"low": 3}) == "low must be smaller than high"
    train = tmp_path / "train.yaml"
    train.write_text("model: smollm2\ndata: pairs.parquet\nout: out\nsteps: 3\n")
    with pytest.raises(InputError) as caught:
        load_config(train, {"recompute_mlpp": True})
    assert caught.value.file is None
    assert str(caught.value) == "invalid train config: unknown key 'recompute_mlpp' (from the command line)"
    train.write_text("model: smollm2\ndata: pairs.parquet\nout: out\nstepz: 3\n")
    with pytest.raises(InputError) as caught:
        load_config(train, {"beta": -1})
    assert caught.value.file == str(train)  # the file's own mistake is there too
    assert "unknown key 'stepz'" in str(caught.value) and "(got -1) (from the command line)" in str(caught.value)
    run = tmp_path / "run.yaml"
    run.write_text("model: smollm2\n")
    with pytest.raises(InputError) as caught:
        load_run_config(run, {"colour": "red"})
    assert caught.value.file == str(run)  # the file misses required keys
    assert "unknown key 'colour' (from the command line)" in str(caught.value)


def test_an_annotate_option_is_not_blamed_on_the_file(tmp_path):
    """The annotate command's options reach into each API teacher (``--concurrency``): a refused one says it came
    from the command line and leaves the file unnamed; the same value in the file names the file."""
    from perpair.annotate.config import load_config

    config = tmp_path / "annotate.yaml"
    config.write_text("teachers:\n  - kind: api\n    base_urls: [http://127.0.0.1:9/v1]\n    model: m\n")
    with pytest.raises(InputError) as caught:
        load_config(config, concurrency=0)
    assert caught.value.file is None
    assert str(caught.value) == ("invalid annotate settings: --concurrency 0: requests in flight per API teacher, "
                                 "from 1 to 4096 (from the command line)")
    with pytest.raises(InputError) as caught:
        load_config(config, teachers=["api:http://127.0.0.1:9/v1/m"], concurrency=0)  # --teacher replaces the file's
    assert caught.value.file is None and str(caught.value).endswith("(from the command line)")
    config.write_text(config.read_text() + "    concurrency: 0\n")
    with pytest.raises(InputError) as caught:
        load_config(config)
    assert caught.value.file == str(config) and "(from the command line)" not in str(caught.value)


def test_a_section_made_by_the_command_line_is_not_blamed_on_the_file(tmp_path):
    """``--set arms.dop.train.lr=1`` (a misspelt arm): the arm exists only on the command line, so its missing preset
    is the command line's mistake, not the file's (it said "file run.yaml: ... arms.dop.preset: Field required")."""
    from perpair.pipeline.config import load_run_config

    config = tmp_path / "run.yaml"
    config.write_text("workdir: w\nmodel: m\ndata: {sources: [x.jsonl]}\narms: {dpo: {preset: dpo}}\n")
    with pytest.raises(InputError) as caught:
        load_run_config(config, {"arms": {"dop": {"train": {"lr": 1}}}})
    assert caught.value.file is None and "arms.dop.preset: Field required" in str(caught.value)
    config.write_text("workdir: w\nmodel: m\ndata: {sources: [x.jsonl]}\narms: {dop: {train: {lr: 1}}}\n")
    with pytest.raises(InputError) as caught:
        load_run_config(config, {"arms": {"dop": {"train": {"lr": 2}}}})  # the file's own arm lacks its preset
    assert caught.value.file == str(config)


def test_a_value_refused_by_the_runs_second_pass_says_it_came_from_the_command_line(tmp_path):
    """The run's keys that only a stage's own config checks (an arm's train keys, prepare's format) were refused
    as "run config, arms.dpo.train.lr: ..." without saying that --set gave the value, as the first pass does."""
    from perpair.pipeline import load_run_config, run

    config = tmp_path / "run.yaml"
    config.write_text("workdir: w\nmodel: m\ndata: {sources: [x.jsonl]}\narms: {dpo: {preset: dpo}}\n")
    for given, words in (({"arms": {"dpo": {"train": {"lr": -1}}}}, "arms.dpo.train.lr: Input should be greater"),
                         ({"train": {"lr": -1}}, "train.lr: Input should be greater"),
                         ({"data": {"format": "bogus"}}, "data.format: unknown format 'bogus'")):
        with pytest.raises(PerpairError) as caught:
            run(load_run_config(config, given))
        assert words in str(caught.value) and str(caught.value).endswith(" (from the command line)")
        assert getattr(caught.value, "file", None) is None
    config.write_text("workdir: w\nmodel: m\ndata: {sources: [x.jsonl]}\narms: {dpo: {preset: dpo, train: "
                      "{lr: -1}}}\n")
    with pytest.raises(InputError) as caught:  # the file's own value: the file is named, the command line not
        run(load_run_config(config, {"train": {"steps": 3}}))
    assert caught.value.file == str(config) and "(from the command line)" not in str(caught.value)


def test_true_or_false_is_not_a_number(tmp_path):
    """Pydantic reads true and false as 1 and 0: `lr: true` trained at 1.0, `steps: yes` (YAML's true) one step,
    `workers: true` one worker, a schedule's `tau: true` routed at 1.0, all silently. Each is refused by its key;
    a truth value where one is expected still reads."""
    from perpair.pipeline.config import load_run_config
    from perpair.plan import resolve_schedule
    from perpair.train import load_config

    config = tmp_path / "run.yaml"
    base = "workdir: w\nmodel: m\narms: {dpo: {preset: dpo}}\n"
    data = "data: {sources: [x.jsonl]}\n"
    for line, words in (("workers: true\n" + data, "workers: expected a number, got true"),
                        ("data: {sources: [x.jsonl], limit: yes}\n", "data.limit: expected a number, got true"),
                        ("eval: {preference: {beta: false}}\n" + data,
                         "eval.preference.beta: expected a number, got false")):
        config.write_text(base + line)
        with pytest.raises(InputError, match=re.escape(words)):
            load_run_config(config)
    config.write_text(base + "eval: {base: false}\ndata: {sources: [x.jsonl], strict: yes}\n")
    loaded = load_run_config(config)
    assert loaded.eval.base is False and loaded.data.strict is True
    train = {"model": "m", "data": "d", "out": "o"}
    for key, value in (("lr", True), ("steps", True), ("lora", {"r": True})):
        with pytest.raises(PerpairError, match=rf"{key}.*expected a number, got true"):
            load_config(None, {**train, key: value})
    assert load_config(None, {**train, "steps": 3, "shuffle": True}).shuffle is True
    with pytest.raises(PerpairError, match=r"routing\.tau: expected a number, got true"):
        resolve_schedule("mixdpo", None, None, {"routing": {"tau": True}})
    # a tuple of bounded numbers (Annotated items): read as (0, 0.4, 0.7, 1) before
    with pytest.raises(PerpairError, match=r"beta\.magnitude_gain: expected numbers, got false in"):
        resolve_schedule("sp2dpo", None, None, {"beta": {"magnitude_gain": [False, 0.4, 0.7, True]}})
    assert resolve_schedule("sp2dpo", None, None, {"beta": {"magnitude_gain": [0, 0.4, 0.7, 1]}}).beta.magnitude_gain \
        == (0, 0.4, 0.7, 1)


def test_true_or_false_is_not_a_number_in_a_teacher_or_prepare_options(tmp_path):
    """A teacher's keys (`max_tokens: true`, `batch_size: yes`, `magnitude_edges: [true, 3]`) and prepare's
    options (`PrepareOptions(limit=True)`) read true/false as 1/0 too; they are refused with the same words, and
    a teacher's kind is still found."""
    from perpair.annotate import load_config
    from perpair.data import PrepareOptions

    config = tmp_path / "annotate.yaml"
    api = "{kind: api, model: m, base_urls: ['http://127.0.0.1:1/v1'], "
    for teacher, words in ((api + "max_tokens: true}", "teachers.0.api.max_tokens: expected a number, got true"),
                           (api + "concurrency: yes}", "teachers.0.api.concurrency: expected a number, got true"),
                           ("{kind: local, model: m, batch_size: true}",
                            "teachers.0.local.batch_size: expected a number, got true"),
                           ("{kind: ratings, weight: false}",
                            "teachers.0.ratings.weight: expected a number, got false"),
                           ("{kind: ratings, magnitude_edges: [true, 3]}",
                            "teachers.0.ratings.magnitude_edges: expected numbers, got true"),
                           ("{kind: bogus}", "teachers.0: a teacher's 'kind' must be 'ratings', 'local' or 'api'")):
        config.write_text(f"teachers: [{teacher}]\n")
        with pytest.raises(InputError, match=re.escape(words)):
            load_config(config)
    config.write_text("teachers: [{kind: local, model: m, calibrate: false, batch_size: 2}]\n")
    teacher = load_config(config).teachers[0]
    assert teacher.calibrate is False and teacher.batch_size == 2
    for key in ("limit", "test_fraction", "seed"):
        with pytest.raises(ValueError, match=f"{key}\n.*expected a number, got true"):
            PrepareOptions(**{key: True})
    assert PrepareOptions(skip_invalid=True, limit=3).limit == 3


def test_arm_names_that_differ_only_in_case_are_refused(tmp_path):
    """arms/dpo and arms/DPO are one folder on a case-insensitive file system (macOS, Windows): two arms would
    write into each other's plan, checkpoints and evaluations."""
    from perpair.pipeline.config import load_run_config

    config = tmp_path / "run.yaml"
    config.write_text("workdir: w\nmodel: m\ndata: {sources: [x.jsonl]}\narms: {dpo: {preset: dpo}, DPO: {preset: "
                      "sp2dpo}}\n")
    with pytest.raises(InputError, match="arm names 'dpo' and 'DPO' differ only in case"):
        load_run_config(config)
