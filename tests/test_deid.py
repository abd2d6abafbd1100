"""De-identification at the site (task.deidentify, task/deid.py): each recogniser, what it must
leave alone, idempotence and counts; the settings checked at config time; a site that turns it
on by itself; a canary that planted identifiers never reach the tokenizer on the real site
path; and one 2-site DP simulation whose ledger audits and whose sites keep only counts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fedshield.conf import ConfigError
from fedshield.conf.config import Config
from fedshield.task.deid import DeidSpec, Scrubber, deidentified
from tests.helpers import synthetic_rows, tiny_overrides, train_message, write_csv

MRN = ("MRN", r"MRN-\d{6}")


def scrub(text: str, *, regions: tuple[str, ...] = (), patterns: tuple[tuple[str, str], ...] = ()) -> str:
    return Scrubber(DeidSpec(patterns, regions)).scrub(text)


# ------------------------------------------------------------------ recognisers


@pytest.mark.parametrize("text, regions, expected", [
    ("call +44 20 7946 0958 today", (), "call [PHONE] today"),  # international form: no region needed
    ("call 020 7946 0958 today", ("GB",), "call [PHONE] today"),
    ("call 020 7946 0958 today", (), "call 020 7946 0958 today"),  # a national form needs its region
    ("call (202) 555-0143 or 202-555-0143", ("US",), "call [PHONE] or [PHONE]"),
    ("appel au 01 42 68 53 00", ("FR",), "appel au [PHONE]"),
])
def test_phone_numbers_by_region(text, regions, expected):
    assert scrub(text, regions=regions) == expected


def test_emails_and_urls():
    text = "Mail jo.smith+ward@nhs.example.org or see https://intranet.example.org/p?id=7. Also www.example.com."
    assert scrub(text) == "Mail [EMAIL] or see [URL]. Also [URL]."


def test_iban_and_cards_only_with_a_valid_checksum():
    assert scrub("IBAN GB82 WEST 1234 5698 7654 32 and DE89370400440532013000.") == "IBAN [IBAN] and [IBAN]."
    assert scrub("IBAN GB82 WEST 1234 5698 7654 33") == "IBAN GB82 WEST 1234 5698 7654 33"  # mod-97 fails
    assert scrub("card 4111 1111 1111 1111, 5500-0000-0000-0004") == "card [CREDIT_CARD], [CREDIT_CARD]"
    assert scrub("card 4111 1111 1111 1112") == "card 4111 1111 1111 1112"  # Luhn fails
    assert scrub("order 1111111111111117") == "order 1111111111111117"  # Luhn passes, no issuer starts with 1


def test_national_ids_of_the_sites_regions_only():
    assert scrub("SSN 123-45-6789", regions=("US",)) == "SSN [NATIONAL_ID]"
    assert scrub("SSN 123-45-6789") == "SSN 123-45-6789"  # US not among the regions
    assert scrub("SSN 000-45-6789", regions=("US",)) == "SSN 000-45-6789"  # never issued
    assert scrub("NHS no 943 476 5919", regions=("GB",)) == "NHS no [NATIONAL_ID]"
    assert scrub("NHS no 943 476 5918", regions=("GB",)) == "NHS no 943 476 5918"  # mod-11 fails
    assert scrub("CPF 390.533.447-05", regions=("BR",)) == "CPF [NATIONAL_ID]"


def test_ip_addresses():
    assert scrub("from 192.168.1.20 and 2001:db8::1 and fe80::1ff:fe23:4567:890a.") == \
        "from [IP_ADDRESS] and [IP_ADDRESS] and [IP_ADDRESS]."
    assert scrub("version 1.2.3.4.5, 999.1.1.1 and at 12:30:45") == "version 1.2.3.4.5, 999.1.1.1 and at 12:30:45"


def test_full_dates_but_not_dates_in_prose():
    text = "Seen 2021-05-03, 03/05/2021, 3 May 2021, 3rd of May, 2021 and May 3, 2021."
    assert scrub(text) == "Seen [DATE], [DATE], [DATE], [DATE] and [DATE]."
    prose = "In 2021, in May and in May 2021, on Monday 3 May, the 1990s; 31/02/2021 is no date; 12/25 rate."
    assert scrub(prose) == prose


def test_site_patterns_run_first_and_are_typed_by_their_name():
    spec = (MRN, ("WARD", r"\bWard [A-Z]\d\b"))
    assert scrub("MRN-123456 moved to Ward B7", patterns=spec) == "[MRN] moved to [WARD]"
    assert scrub("MRN-12345 (too short)", patterns=spec) == "MRN-12345 (too short)"


def test_ordinary_numbers_are_left_alone():
    text = ("In 2021, 1,234,567 people paid 4,500.00 at 12:30; ratio 3.5; pages 12-14; room 1234; "
            "won 7-6 (7-5) 4-6 6-3 4-6 6-0; up 0.25%; 98.6F; a 150-200 mg dose; chapter 11; 2024/25 season.")
    assert scrub(text, regions=("US", "GB", "FR", "DE")) == text


def test_scrubbing_scrubbed_text_changes_nothing():
    spec = DeidSpec((MRN, ("CAPS", r"[A-Z]{4,}")), ("US", "GB"))  # CAPS would match inside a placeholder
    scrubber = Scrubber(spec)
    text = ("MRN-123456: call 020 7946 0958, jo@example.org, https://x.example.org, 10.0.0.1, "
            "SSN 123-45-6789 on 2021-05-03 AND MORE")
    once = scrubber.scrub(text)
    assert "[PHONE]" in once and "[MRN]" in once and "[CAPS]" in once
    assert scrubber.scrub(once) == once
    counts: Counter[str] = Counter()
    assert scrubber.scrub(once, counts) == once and not counts


def test_counts_by_type_and_the_data_keeps_its_labels(tmp_path):
    from fedshield.task.data import load_text_file

    rows = [("call 020 7946 0958 or +1 202-555-0143", "a"), ("MRN-123456 jo@example.org", "b"),
            ("nothing here 42", "a")]
    data = load_text_file(write_csv(tmp_path / "d.csv", rows))
    spec = DeidSpec((MRN,), ("GB",))
    clean, counts = deidentified(data, spec)
    assert counts == Counter({"PHONE": 2, "MRN": 1, "EMAIL": 1})
    assert clean.texts == ["call [PHONE] or [PHONE]", "[MRN] [EMAIL]", "nothing here 42"]
    assert list(clean.labels) == list(data.labels) and clean.class_names == data.class_names
    assert data.texts[0].startswith("call 020")  # the loaded records are not changed in place
    assert deidentified(data, spec)[0] is clean  # once per data object and spec


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize("override, key, what", [
    ("task.deidentify_patterns=['MRN=MRN-(\\d{6}']", "task.deidentify_patterns", "not a regular expression"),
    ("task.deidentify_patterns=['MRN']", "task.deidentify_patterns", "expected NAME=REGEX"),
    ("task.deidentify_patterns=['mrn=x']", "task.deidentify_patterns", "NAME must be upper-case"),
    ("task.deidentify_patterns=['PHONE=x']", "task.deidentify_patterns", "built-in type"),
    ("task.deidentify_patterns=['MRN=\\d*']", "task.deidentify_patterns", "matches the empty string"),
    ("task.deidentify_patterns=['A=x','A=y']", "task.deidentify_patterns", "named twice"),
    ("task.deidentify_regions=[GB,XX]", "task.deidentify_regions", "'XX': not a region"),
])
def test_bad_settings_are_one_line_naming_the_key(override, key, what):
    with pytest.raises(ConfigError) as info:
        Config.load(["task.deidentify=true", override])
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"config: {key}") and what in message


def test_text_tasks_only_and_off_by_default():
    from fedshield.task.pipeline import TaskSpec

    with pytest.raises(ConfigError, match="task.deidentify=true: text tasks only"):
        Config.load(["task=heart-disease", "task.deidentify=true"])
    assert TaskSpec.of(Config.load([]).task).deidentify is None  # the default run is unchanged
    on = Config.load(["task.deidentify=true", "task.deidentify_regions=[gb]",
                      "task.deidentify_patterns=['MRN=MRN-\\d{6}']"])
    assert TaskSpec.of(on.task).deidentify == DeidSpec((MRN,), ("GB",))


def test_a_site_turns_it_on_and_only_adds_to_the_plan():
    from fedshield.client.app import site_config
    from fedshield.client.cli import check_overrides, node_config

    plan = Config.load([])
    own = check_overrides(["task.deidentify=true", "task.deidentify_patterns=['MRN=MRN-\\d{6}']",
                           "task.deidentify_regions=[GB]"])
    line = node_config("st-marys", Path("/d.csv"), Path("/s"), own)
    from flwr.common.config import parse_config_args  # how a SuperNode reads --node-config

    node = parse_config_args([line])
    task = site_config(plan, node).task
    assert (task.deidentify, task.deidentify_patterns, task.deidentify_regions) == (True, ("MRN=MRN-\\d{6}",), ("GB",))
    strict = Config.load(["task.deidentify=true", "task.deidentify_patterns=['MRN=M\\d{4}','KEY=K\\d+']",
                          "task.deidentify_regions=[US]"])
    task = site_config(strict, {"task.deidentify": False, **{k: v for k, v in node.items() if "." in k
                                                             and k != "task.deidentify"}}).task
    assert task.deidentify  # a site cannot turn off what the plan asks for
    assert task.deidentify_regions == ("GB", "US")
    # A deployed site runs only its own regexes on its records, never the coordinator's.
    assert task.deidentify_patterns == ("MRN=MRN-\\d{6}",)
    assert site_config(strict, {}).task.deidentify_patterns == ()
    # A simulation's virtual sites take the plan's patterns too (one name: either regex).
    merged = site_config(strict, {k: v for k, v in node.items() if "." in k}, deployed=False).task
    assert merged.deidentify_patterns == ("MRN=(?:MRN-\\d{6})|(?:M\\d{4})", "KEY=K\\d+")
    with pytest.raises(ConfigError, match="task.deidentify_regions"):
        site_config(plan, {"task.deidentify_regions": "[XX]"})


# ------------------------------------------------------------------ the real site path

PLANTED = "patient MRN-123456 call 020 7946 0958 or jo.smith@example.org"


@pytest.mark.usefixtures("flower_task_identity")
def test_planted_identifiers_never_reach_the_tokenizer(tiny_bert, tmp_path, monkeypatch):
    """A deployed site whose own policy turns de-identification on (the plan does not): the
    texts its tokenizer receives, and the token ids it trains on, hold placeholders instead of
    the planted values; its state folder keeps the counts only; its reply carries none."""
    from flwr.app import Context, RecordDict

    import fedshield.client.app as site
    from fedshield import protocol
    from fedshield.task import pipeline
    from fedshield.task.pipeline import build_view, tokenizer

    rows = synthetic_rows(60, seed=5)
    rows[1] = (PLANTED, rows[1][1])
    data = write_csv(tmp_path / "site.csv", rows)
    cfg = Config.load(tiny_overrides(tiny_bert, data, tmp_path, **{
        "privacy.delta": 1e-5, "privacy.noise_multiplier": 5.0, "task.max_length": 32, "training.local_epochs": 1,
        "training.center_features": False}))
    assert not cfg.task.deidentify
    seen: list[tuple[list[str], object]] = []
    real = pipeline._tokenize

    def spy(cfg, texts):
        ids, mask = real(cfg, texts)
        seen.append((list(texts), ids))
        return ids, mask

    monkeypatch.setattr(pipeline, "_tokenize", spy)
    view = build_view(cfg)
    msg = train_message(cfg, "canary")
    state = tmp_path / "state"
    node = {"site-name": "st-marys", "data-path": str(data), "state-dir": str(state), "task.deidentify": True,
            "task.deidentify_patterns": '["MRN=MRN-\\\\d{6}"]', "task.deidentify_regions": '["GB"]'}
    reply = site.train(msg, Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config={}))
    assert isinstance(protocol.read_train_reply(reply, {k: (v.shape, v.dtype) for k, v in
                                                        view.trainable_state().items()}), protocol.TrainReply)

    texts, ids = seen[-1]  # the site's own encoding of its records for this round
    assert "patient [MRN] call [PHONE] or [EMAIL]" in texts
    assert not any(v in t for t in texts for v in ("123456", "7946", "0958", "jo.smith", "example.org"))
    decoded = tokenizer(cfg.task.model).decode(ids[texts.index("patient [MRN] call [PHONE] or [EMAIL]")],
                                               skip_special_tokens=True)
    assert decoded == "patient [ mrn ] call [ phone ] or [ email ]"

    record = json.loads((state / "deidentified.json").read_text())
    assert record == {"records": 60, "replaced": {"EMAIL": 1, "MRN": 1, "PHONE": 1}, "patterns": ["MRN"],
                      "regions": ["GB"]}
    sent = json.dumps({name: dict(rec) for name, rec in reply.content.config_records.items()}, default=str) + \
        json.dumps({name: dict(rec) for name, rec in reply.content.metric_records.items()}, default=str)
    assert "PHONE" not in sent and "deidentif" not in sent and "7946" not in sent


# ------------------------------------------------------------------ end to end


@pytest.mark.e2e
def test_two_site_dp_run_with_deidentification_audits_and_keeps_only_counts(tiny_bert, tmp_path):
    import fedshield
    from fedshield.simulations.simulate import run_simulation

    rows = synthetic_rows(160, seed=7)
    for i in range(0, 160, 20):  # planted in both sites' shares
        rows[i] = (f"{rows[i][0]} ring +44 20 7946 0958 MRN-{100000 + i} ops@example.org", rows[i][1])
    data = write_csv(tmp_path / "notes.csv", rows)
    cfg = Config.load(tiny_overrides(tiny_bert, data, tmp_path, **{
        "federation.num_sites": 2, "task.max_length": 32, "privacy.noise_multiplier": 1.0, "training.local_epochs": 1,
        "task.deidentify": "true", "task.deidentify_patterns": "['MRN=MRN-\\d{6}']"}))
    run = run_simulation(cfg)

    assert fedshield.audit(run, write_report=False).ok
    entries = [json.loads(line) for line in (run / "privacy" / "ledger.jsonl").read_text().splitlines()]
    assert {e["site"] for e in entries} == {"site-0", "site-1"}
    total: Counter[str] = Counter()
    for name in ("site-0", "site-1"):
        text = (run / "sites" / name / "deidentified.json").read_text()
        record = json.loads(text)
        assert set(record) == {"records", "replaced", "patterns", "regions"} and record["patterns"] == ["MRN"]
        assert not any(v in text for v in ("7946", "example.org", "MRN-1"))
        total.update(record["replaced"])
    planted = sum(1 for r in rows if "MRN-" in r[0] and "7946" in r[0])
    # The test split keeps some planted rows at the coordinator: the sites count the rest.
    assert 0 < total["PHONE"] == total["MRN"] == total["EMAIL"] <= planted and set(total) == {"PHONE", "MRN", "EMAIL"}
    for released in ("privacy/ledger.jsonl", "metrics.jsonl", "report.md"):
        assert "deidentif" not in (run / released).read_text()
