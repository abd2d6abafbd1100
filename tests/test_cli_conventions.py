"""The `fedshield` command's conventions: early errors before the ML stack is imported or a
run directory made, hidden commands kept hidden, `--resume [RUN]` alike on `simulate` and
`server`, distinct flag names, examples in every `--help`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedshield.simulations.cli import HIDDEN, main
from tests.helpers import synthetic_rows, tiny_overrides, write_csv

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "flwr", "transformers", "ray")


def run_in_fresh_python(argv: list[str]) -> tuple[int, str, list[str]]:
    """`fedshield ARGV` in a new interpreter: (exit code, stderr, the heavy modules it imported)."""
    code = ("import sys\nfrom fedshield.simulations.cli import main\nrc = main(sys.argv[1:])\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\nsys.exit(rc)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    return out.returncode, out.stderr, eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own print


@pytest.mark.parametrize("command", ["simulate", "sweep privacy.target_epsilon=1,2", "audit --empirical"])
def test_a_config_typo_is_one_line_before_torch_flower_or_ray_is_imported(tmp_path, command):
    rc, err, heavy = run_in_fresh_python([*command.split(), "federation.roundz=3", f"output.dir={tmp_path}"])
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: override: unknown key 'federation.roundz' "
                                                   "(did you mean 'federation.rounds'?)")
    assert heavy == []
    assert not any(tmp_path.iterdir())


def test_a_wrong_model_folder_is_one_line_before_ray_starts_and_leaves_no_run_dir(tmp_path):
    rc, err, heavy = run_in_fresh_python(["simulate", "task.model=/nonexistent/model", f"output.dir={tmp_path}"])
    assert rc == 2
    lines = err.splitlines()
    assert lines == ["error: task.model='/nonexistent/model': no such folder (a from_pretrained folder: "
                     "config.json and weights)"]
    assert "ray" not in heavy and "flwr" not in heavy
    assert not any(tmp_path.iterdir())


def never_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the simulation runtime (Ray, the run itself) is reached."""
    import fedshield.simulations.simulate as simulate

    def started(*args: object, **kwargs: object) -> Path:
        raise AssertionError("the simulation started although a check should have failed first")

    monkeypatch.setattr(simulate, "_run_in_run_dir", started)


def test_a_model_head_for_other_classes_or_a_missing_data_file_leaves_no_run_dir(tiny_bert, tmp_path, monkeypatch,
                                                                                  capsys):
    never_started(monkeypatch)
    rows = [(text, "sports" if i % 3 == 0 else label) for i, (text, label) in enumerate(synthetic_rows(60, seed=2))]
    three_classes = write_csv(tmp_path / "three.csv", rows)
    assert main(["simulate", *tiny_overrides(tiny_bert, three_classes, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "its classification head has 2 outputs but the task has 3 classes" in err
    assert main(["simulate", *tiny_overrides(tiny_bert, tmp_path / "missing.csv", tmp_path)]) == 2
    assert "missing.csv" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_start_that_fails_before_anything_was_written_leaves_no_run_dir(tiny_bert, synthetic_csv, tmp_path,
                                                                          monkeypatch, capsys):
    import fedshield.simulations.simulate as simulate
    from fedshield.privacy.errors import FedShieldError

    def fails(cfg, run_dir, *args, **kwargs):
        if cfg.output.run_name == "kept":  # a site wrote its state: that run is kept
            (run_dir / "sites" / "site-0").mkdir(parents=True)
            (run_dir / "sites" / "site-0" / "ledger.jsonl").write_text("{}\n")
        raise FedShieldError("the runtime could not start")

    monkeypatch.setattr(simulate, "_run_in_run_dir", fails)
    (tmp_path / "runs" / "users-own").mkdir(parents=True)  # an empty folder the user made: it stays
    for name in ("gone", "kept", "users-own"):
        overrides = tiny_overrides(tiny_bert, synthetic_csv, tmp_path, **{"output.run_name": name})
        assert main(["simulate", *overrides]) == 2
        assert "error: the runtime could not start" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["kept", "users-own"]


def test_the_first_line_comes_before_the_checks(tmp_path, capsys):
    assert main(["simulate", "task.model=/nonexistent/model", f"output.dir={tmp_path}"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("fedshield ") and ": simulating 8 sites x " in out.splitlines()[0]


# ------------------------------------------------------------------ commands and flags


def test_an_unknown_command_lists_only_the_public_ones(capsys):
    assert main(["foo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown command 'foo'; one of: simulate, ")
    assert HIDDEN and not any(hidden in err for hidden in HIDDEN)
    for hidden in HIDDEN:  # a hidden command is not reachable by its internal name either
        assert main([hidden]) == 2
        assert "unknown command" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["simulate", "sweep", "server", "client", "certs", "audit", "bundle",
                                     "audit --empirical"])
def test_every_help_shows_examples(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command.split(), "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "\nexamples:\n" in out
    assert f"  fedshield {command.split()[0]} " in out.split("examples:")[1]


def test_sweep_help_shows_the_axis_syntax(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    out = capsys.readouterr().out
    assert "fedshield sweep privacy.target_epsilon=1,2,4,8\n" in out
    assert "KEY=a,b,c" in out


def test_the_empirical_audits_site_is_virtual_site_and_site_still_works_with_a_note(tmp_path, capsys):
    base = ["audit", "--empirical", "federation.num_sites=2", f"output.dir={tmp_path}"]
    assert main([*base, "--virtual-site", "site-7"]) == 2
    assert capsys.readouterr().err == ("error: --virtual-site='site-7': must be one of site-0, site-1 "
                                       "(federation.num_sites)\n")
    assert main([*base, "--site", "site-7"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "note: --site is deprecated; use --virtual-site",
        "error: --virtual-site='site-7': must be one of site-0, site-1 (federation.num_sites)"]


# ------------------------------------------------------------------ --resume [RUN]


def make_run(base: Path, name: str, mtime: float) -> Path:
    run = base / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("federation:\n  rounds: 2\n")
    (run / "metrics.jsonl").write_text("{}\n")
    os.utime(run / "metrics.jsonl", (mtime, mtime))
    return run


def test_resume_finds_a_run_by_folder_by_name_or_the_newest(tmp_path):
    from fedshield.conf import ConfigError
    from fedshield.server.run_dir import run_to_resume

    runs = tmp_path / "runs"
    old, new = make_run(runs, "old", 1_000_000), make_run(runs, "new", 2_000_000)
    (runs / ".new.flower").mkdir()  # a coordinator's Flower home is not a run
    elsewhere = make_run(tmp_path / "elsewhere", "job", 500)
    assert run_to_resume(True, str(runs)) == new
    assert run_to_resume(True, str(runs), "old") == old
    assert run_to_resume("old", str(runs)) == old
    assert run_to_resume(str(elsewhere), str(runs)) == elsewhere
    with pytest.raises(ConfigError, match=r"^--resume nope: holds no run to resume"):
        run_to_resume("nope", str(runs))
    with pytest.raises(ConfigError, match=r"^--resume: output.dir='.*empty' holds no run; name one with --resume RUN"):
        run_to_resume(True, str(tmp_path / "empty"))


@pytest.mark.parametrize("how", [["--resume", "{run}"], ["--resume", "half"], ["--resume"],
                                 ["output.run_name=half", "--resume"]])
def test_simulate_resume_names_the_run_as_server_does(tmp_path, capsys, monkeypatch, how):
    """Every spelling reaches the same run; this one has no checkpoint, so each is refused by
    the checkpoint (which proves the run was found), before Ray starts."""
    never_started(monkeypatch)
    run = make_run(tmp_path, "half", 1_000)
    make_run(tmp_path / "other", "x", 1)
    argv = [a.format(run=run) for a in how]
    assert main(["simulate", f"output.dir={tmp_path}", *argv]) == 2
    err = capsys.readouterr().err
    assert "half" in err and "holds no run to resume" not in err, err


def test_server_resume_takes_a_run_folder(tmp_path):
    import argparse

    from fedshield.server.cli import resolve_config

    run = make_run(tmp_path / "somewhere", "job", 1)
    args = argparse.Namespace(resume=str(run), overrides=[f"output.dir={tmp_path / 'runs'}"], config=None)
    cfg, run_dir = resolve_config(args)
    assert run_dir == run and cfg.output.run_name == "job" and Path(cfg.output.dir) == run.parent
    assert cfg.federation.rounds == 2  # the run's own config
