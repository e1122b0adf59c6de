"""YAML files a user wrote: every problem is one line naming the file and, where there is one, line and column."""

import pytest
from pydantic import BaseModel

from autosquash.errors import AutosquashError
from autosquash.yaml_io import load_yaml_model


class Inner(BaseModel):
    tokens: int


class Config(BaseModel):
    name: str
    trials: int
    calibration: Inner


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "name: x\ntrials: many\ncalibration: {tokens: 3}\n",
            r"c.yaml:2:1: field 'trials': Input should be a valid int",
        ),
        ("name: x\ntrials: 2\ncalibration: {tokens: three}\n", r"c.yaml:3:15: field 'calibration.tokens'"),
        ("name: x\n  trials: [2\n", r"c.yaml:2:9: not valid YAML: mapping values are not allowed here"),
        ("name: x\ntrials: [2\n", r"c.yaml:3:1: not valid YAML"),
        ("", r"c.yaml: empty \(no YAML mapping in it\)"),
    ],
)
def test_the_error_names_file_line_column_and_field(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(AutosquashError, match=message):
        load_yaml_model(Config, path)


def test_a_binary_file_is_not_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(bytes(range(128, 256)))
    with pytest.raises(AutosquashError, match="c.yaml: not a YAML file \\(not UTF-8 text\\)"):
        load_yaml_model(Config, path)
