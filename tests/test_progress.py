"""Progress on stderr: plain complete lines when stderr is a log, silence when disabled."""

import io
import time

from stepscope import progress


def test_a_bar_in_a_log_writes_complete_lines_and_a_last_one(capsys):
    bar = progress.bar(3, "step-saliency", "layer", mininterval=0)
    for _ in range(3):
        bar.update(1)
    bar.close()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "\r" not in captured.err and "\x1b" not in captured.err
    lines = captured.err.splitlines()
    assert lines[0].startswith("step-saliency: 0/3 layers (0%)")
    assert lines[-1].startswith("step-saliency: 3/3 layers (100%)")
    assert len(lines) == len(set(lines)) == 4  # the start, each update, no repeat of the last state on close


def test_a_log_gets_a_line_per_interval_not_per_update(capsys):
    bar = progress.bar(500, "generating", "token", mininterval=60)
    for _ in range(500):
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["generating: 0/500 tokens (0%)",
                                                      "generating: 500/500 tokens (100%)"]


def test_messages_never_land_inside_a_progress_line(capsys):
    bar = progress.bar(2, "report", "figure", mininterval=0)
    bar.update(1)
    progress.write("warning: something")
    bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert "warning: something" in lines
    assert all(line.startswith("report: ") for line in lines if line != "warning: something")


def test_a_disabled_bar_prints_nothing(capsys):
    bar = progress.bar(3, "x", enabled=False)
    bar.update(3)
    bar.close()
    assert capsys.readouterr().err == ""


def test_interactive_means_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert progress.interactive(Tty()) and not progress.interactive(io.StringIO())
    assert not progress.interactive(object())  # no isatty at all


def test_a_phase_is_announced_only_when_it_takes_a_while(capsys):
    with progress.phase("quick", delay=5):
        pass
    assert capsys.readouterr().err == ""
    with progress.phase("slow", delay=0.01):
        time.sleep(0.2)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "slow ..." and lines[1].startswith("slow: done in ")
    try:
        with progress.phase("failing", delay=0.01):
            time.sleep(0.2)
            raise RuntimeError("x")
    except RuntimeError:
        pass
    assert capsys.readouterr().err.splitlines() == ["failing ..."]  # no "done" for a step that failed
