"""A deployed site says what its data is for (its own `task.name`): `fedshield client` reads
the file as that task's records before it connects, and a plan for another task is declined
(kind `policy`) before a record is read."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from fedshield.client.app import TaskNotAllowed, site_config
from fedshield.client.cli import check_data, check_overrides
from fedshield.conf import ConfigError
from fedshield.conf.config import Config
from fedshield.privacy.errors import FedShieldError


def _plan(*overrides: str) -> Config:
    return Config.load(list(overrides))


def test_a_site_declares_a_built_in_task_and_nothing_else():
    assert check_overrides(["task.name=image"]) == {"task.name": "image"}
    assert check_overrides(["task.name=tabular", "privacy.budget_epsilon=3"])["task.name"] == "tabular"
    with pytest.raises(ConfigError, match="task.name='imag'.*one of news-topics, text-file, tabular, image"):
        check_overrides(["task.name=imag"])


@pytest.mark.parametrize("own, planned, declined", [
    ("image", "image", False),
    ("text-file", "news-topics", False),  # a file of texts and labels serves either
    ("", "image", False),  # a site that said nothing: as before, the plan's task reads its file
    ("image", "text-file", True),
    ("tabular", "text-generation", True),
])
def test_a_plan_for_another_task_than_the_sites_data_is_declined(own, planned, declined, tmp_path):
    extra = {"image": ["task=image"], "text-file": ["task=text-file", f"task.data_path={tmp_path}/x.csv"],
             "news-topics": [], "text-generation": ["task=text-generation"]}[planned]
    plan = _plan(*extra)
    node = {"task.name": own} if own else {}
    if declined:
        with pytest.raises(TaskNotAllowed, match=f"this site's data is for task '{own}'.*asks for '{planned}'"):
            site_config(plan, node)
    else:
        assert site_config(plan, node).task.name == planned


def test_check_data_reads_the_file_as_the_sites_task(tmp_path):
    from fedshield.task.image import write_digits

    folder = tmp_path / "digits"
    write_digits(folder)
    images = check_data(folder, None, "text", "label", "image")
    assert images.images is not None and len(images) == 1797 and images.class_names[:2] == ["0", "1"]

    table = tmp_path / "bank.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["age", "default"])
        w.writerows([[30, "no"], [41, "yes"], [52, "no"]])
    rows = check_data(table, ["no", "yes"], "text", "default", "tabular")
    assert list(rows.labels) == [0, 1, 0] and rows.class_names == ["no", "yes"]
    with pytest.raises(FedShieldError, match=r"bank.csv:3: label 'yes' is not one of the site's classes \(no\)"):
        check_data(table, ["no"], "text", "default", "tabular")

    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"text": "first note"}\n{"text": "second note"}\n')
    docs = check_data(notes, None, "text", "label", "text-generation")
    assert docs.texts == ["first note", "second note"]


def test_a_folder_of_images_is_not_read_as_text(tmp_path: Path):
    (tmp_path / "cats").mkdir()
    with pytest.raises(FedShieldError):
        check_data(tmp_path, None, "text", "label")  # the default: a file of texts and labels
