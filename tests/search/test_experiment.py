"""Experiment files: the phone is `phone:` (its old name `device:` still loads, announced); where trials compute
is `hardware.device`."""

from pathlib import Path

import pytest

from autosquash.errors import AutosquashError, DeprecatedInput
from autosquash.search.experiment import load_experiment

SMOKE = Path(__file__).parents[2] / "experiments/smoke.yaml"


def test_the_old_device_field_is_read_as_the_phone_with_a_warning_naming_the_file(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(SMOKE.read_text().replace("phone: iphone-16", "device: pixel-9-pro"))
    with pytest.warns(DeprecatedInput, match=rf"{old}: field 'device' is deprecated .* write 'phone: pixel-9-pro'"):
        exp = load_experiment(old)
    assert exp.phone == "pixel-9-pro" and exp.hardware.device == "auto"
    assert exp.model_copy(update={"phone": "iphone-16"}) == load_experiment(SMOKE).model_copy(
        update={"model": exp.model, "search_space": exp.search_space}
    )


def test_phone_and_device_both_given_is_an_error(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text(SMOKE.read_text() + "device: iphone-16\n")
    with pytest.raises(AutosquashError, match="fields 'phone' and 'device' both given"):
        load_experiment(both)


def test_the_shipped_experiments_name_their_phone_and_warn_nothing(recwarn):
    for path in sorted((SMOKE.parent).glob("*.yaml")):
        assert load_experiment(path).phone
    assert not [w for w in recwarn if issubclass(w.category, DeprecatedInput)]
