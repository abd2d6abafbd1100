"""Progress bars (privacy/progress.py): on stderr, off without a terminal unless asked,
off when FEDSHIELD_PROGRESS=0; the phases that use them give the same results with and
without a bar."""

from __future__ import annotations

from fedshield.privacy.progress import Counter, progress


def test_no_bar_without_a_terminal_and_one_on_request(monkeypatch, capsys):
    monkeypatch.delenv("FEDSHIELD_PROGRESS", raising=False)
    assert list(progress(range(5), "encoding", delay=0)) == [0, 1, 2, 3, 4]
    assert capsys.readouterr() == ("", "")  # pytest's stderr is not a terminal
    monkeypatch.setenv("FEDSHIELD_PROGRESS", "1")
    assert list(progress(range(5), "encoding", total=5, delay=0)) == [0, 1, 2, 3, 4]
    err = capsys.readouterr().err
    assert "encoding" in err and "/5 [" in err  # a bar that knows its total: an ETA
    with Counter("calibrating σ", delay=0) as step:
        for _ in range(3):
            step()
    assert "calibrating σ" in capsys.readouterr().err
    monkeypatch.setenv("FEDSHIELD_PROGRESS", "0")
    assert list(progress(range(5), "encoding", delay=0)) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""


def test_calibration_and_encoding_give_the_same_results_with_bars_on_or_off(monkeypatch, tiny_bert):
    import torch

    from fedshield.privacy.accountant import _calibrate_recorded, calibrate_noise_multiplier
    from fedshield.task.model import build_text_model, prefix_hidden_states

    model = build_text_model(str(tiny_bert), ["a", "b"], seed=0)
    ids = torch.randint(0, 100, (10, 8), generator=torch.Generator().manual_seed(0))
    results = []
    for shown in ("0", "1"):
        monkeypatch.setenv("FEDSHIELD_PROGRESS", shown)
        _calibrate_recorded.cache_clear()  # calibrated again, not read from the cache
        sigma = calibrate_noise_multiplier(4.0, 1e-5, 0.05, 300, "pld")
        hidden = prefix_hidden_states(model, ids, torch.ones_like(ids), 1, batch_size=4)
        assert hidden.shape[0] == 10  # every batch, in order
        results.append((sigma, hidden))
    (s0, h0), (s1, h1) = results
    assert 0.3 < s0 == s1 < 3 and torch.equal(h0, h1)
