import io
import time

from raymeta.progress import Progress


def lines_of(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_progress_prints_every_n_steps_and_at_the_end():
    out = io.StringIO()
    prog = Progress("stage", 5, every=2, unit="tasks", stream=out)
    for step in range(1, 6):
        prog.update(step, 3, loss=1.0)
    steps = [line.split()[2] for line in lines_of(out)]
    assert steps == ["2/5", "4/5", "5/5"]
    assert prog.items == 15 and "loss=1" in lines_of(out)[0] and "tasks/s" in lines_of(out)[0]


def test_progress_with_every_s_prints_a_line_once_that_long_has_passed():
    """A long evaluation (one line at its end) also prints one when every_s have passed."""
    out = io.StringIO()
    prog = Progress("eval BM FT", 100, every=10**9, unit="examples", stream=out, every_s=0.2)
    prog.update(10, 10)
    assert lines_of(out) == []  # too soon
    time.sleep(0.25)
    prog.update(20, 10)
    prog.update(30, 10)  # the line just printed restarts the wait
    assert [line.split()[4] for line in lines_of(out)] == ["20/100"]
    prog.update(100, 70)
    assert [line.split()[4] for line in lines_of(out)] == ["20/100", "100/100"]
    quiet = Progress("x", 3, every=1, stream=out, quiet=True)
    quiet.update(3, 1)
    assert len(lines_of(out)) == 2


def test_progress_rate_is_the_rate_since_the_previous_line(monkeypatch):
    """The printed rate (logged as tasks_per_s) covers the window since the previous line."""
    import types

    from raymeta import progress

    now = [0.0]
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    out = io.StringIO()
    prog = Progress("stage", 4, every=2, stream=out)
    for step, (seconds, items) in enumerate([(1, 10), (1, 10), (4, 10), (1, 30)], start=1):
        now[0] += seconds
        printed = prog.update(step, items)
        assert printed == (step % 2 == 0)
        if printed:
            assert prog.rate == {2: 20 / 2, 4: 40 / 5}[step]
    assert [line.split()[3] for line in lines_of(out)] == ["10.0", "8.0"]
