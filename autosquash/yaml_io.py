"""Load YAML files into validated pydantic models, with errors that name file, field and expectation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from autosquash.errors import AutosquashError
from autosquash.files import write_text

M = TypeVar("M", bound=BaseModel)


def _text(p: Path) -> str:
    try:
        return p.read_text()
    except OSError as e:
        raise AutosquashError(f"cannot read {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise AutosquashError(f"{p}: not a YAML file (not UTF-8 text)") from None


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file safely (no arbitrary object construction); a syntax error names its line and column."""
    p = Path(path)
    text = _text(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise AutosquashError(f"{p}{where}: not valid YAML: {problem}") from None
    if data is None:
        raise AutosquashError(f"{p}: empty (no YAML mapping in it)")
    return data


def _line_of(path: Path, loc: tuple) -> str:
    """':line:column' of the YAML node at the field path `loc` in `path` (of the nearest key that exists)."""
    try:
        node = yaml.compose(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return ""
    mark = node.start_mark if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if match is None:
                break
            mark, node = match[0].start_mark, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            mark = node.start_mark
        else:
            break
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def validate(model: type[M], data: Any, source: str, path: Path | None = None) -> M:
    """Validate `data` as `model`; the error names `source` (with the field's line and column when `path` is
    its file), the first bad field and what was expected."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "(top level)"
        where = _line_of(path, err["loc"]) if path is not None else ""
        raise AutosquashError(f"{source}{where}: field {field!r}: {err['msg']}") from None


def load_yaml_model(model: type[M], path: str | Path) -> M:
    """Read `path` and validate it as `model`."""
    return validate(model, read_yaml(path), str(path), Path(path))


def dump_yaml_model(obj: BaseModel, path: str | Path) -> None:
    """Write a model as YAML that `load_yaml_model` reads back to an equal model."""
    write_text(path, yaml.safe_dump(obj.model_dump(mode="json"), sort_keys=False))
