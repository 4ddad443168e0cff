"""Progress bars show on a terminal and stay quiet elsewhere (tests, logs, pipes)."""

import io

from rich.console import Console

from vqad_nerfstudio import progress


def _output(monkeypatch, terminal: bool) -> str:
    buffer = io.StringIO()
    monkeypatch.setattr(progress, "CONSOLE", Console(file=buffer, force_terminal=terminal, width=80))
    assert list(progress.track(range(3), "Decoding levels of detail")) == [0, 1, 2]
    with progress.status("Range-coding plane latents"):
        pass
    return buffer.getvalue()


def test_progress_shows_on_a_terminal(monkeypatch):
    assert "Decoding levels of detail" in _output(monkeypatch, terminal=True)


def test_progress_is_quiet_elsewhere(monkeypatch):
    assert _output(monkeypatch, terminal=False) == ""
