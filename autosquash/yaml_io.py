"""Load YAML files into validated pydantic models, with errors that name file, field and expectation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from autosquash.errors import AutosquashError

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file safely (no arbitrary object construction)."""
    p = Path(path)
    try:
        return yaml.safe_load(p.read_text())
    except OSError as e:
        raise AutosquashError(f"cannot read {p}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise AutosquashError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None


def validate(model: type[M], data: Any, source: str) -> M:
    """Validate `data` as `model`; the error names `source`, the first bad field and what was expected."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise AutosquashError(f"{source}: field {field!r}: {err['msg']}") from None


def load_yaml_model(model: type[M], path: str | Path) -> M:
    """Read `path` and validate it as `model`."""
    return validate(model, read_yaml(path), str(path))


def dump_yaml_model(obj: BaseModel, path: str | Path) -> None:
    """Write a model as YAML that `load_yaml_model` reads back to an equal model."""
    Path(path).write_text(yaml.safe_dump(obj.model_dump(mode="json"), sort_keys=False))
