import io

from autosquash.search.outputs import Progress


def _rows(n: int) -> list[dict]:
    return [{"memory_mb": 400 + i, "perplexity": 60 - i} for i in range(n)]


def test_trial_lines_count_the_front_and_time_left():
    out = io.StringIO()
    p = Progress(total=8, already_done=0, stream=out)
    p.trial(1, 0, "baseline", None, "out of memory", front=0)
    p.trial(
        2,
        1,
        "proposed",
        {"perplexity": 57.0, "kl": 0.02, "memory_mb": 439.2, "energy_mj_per_token": 92.7, "trial_s": 27.0},
        None,
        front=1,
    )
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[  1/8] trial   0 baseline FAILED: out of memory  | front 0")
    assert "ppl    57.00" in lines[1] and "mem   439.2 MB" in lines[1] and "| front 1" in lines[1]
    assert all("min left" in line for line in lines)


def test_the_front_is_shown_at_each_quarter_once():
    out = io.StringIO()
    p = Progress(total=8, already_done=0, stream=out)
    for done in range(1, 9):
        p.front(done, _rows(done))
    p.front(4, _rows(4))  # a quarter already shown (a resumed count passing it again) is not repeated
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "  front after 2 trials",
        "  front after 4 trials",
        "  front after 6 trials",
    ]
    assert lines[0].endswith("400.0 MB ppl 60.00; 401.0 MB ppl 59.00")


def test_a_long_front_is_cut_short():
    out = io.StringIO()
    Progress(total=40, already_done=0, stream=out).front(10, _rows(12), shown=3)
    assert out.getvalue().strip().endswith("402.0 MB ppl 58.00, +9 more")


def _metrics(ppl: float, kl: float, weights: float) -> dict:
    return {"perplexity": ppl, "kl": kl, "memory_mb": weights + 300, "weights_mb": weights, "energy_mj_per_token": 90.0}


def test_the_live_panel_keeps_the_lines_and_shows_the_best_plan_per_size_band():
    out = io.StringIO()
    p = Progress(total=6, already_done=0, stream=out, live=True)
    for i, (kl, weights) in enumerate([(0.30, 60.0), (0.20, 62.0), (0.05, 90.0), (0.01, 100.0), (0.02, 99.0)]):
        p.trial(i + 1, i, "sampled", {**_metrics(50 + kl, kl, weights), "trial_s": 20.0}, None, front=1)
    p.trial(6, 5, "sampled", None, "MemoryError: out of memory", front=1)
    bands = p.bands()
    assert [b for b, _ in bands] == ["60-68", "68-76", "76-84", "84-92", "92-100"]
    assert [None if r is None else r["trial"] for _, r in bands] == [1, None, None, 2, 3]  # lowest KL in each band
    assert p.failures == 1
    p.close()
    text = out.getvalue()
    assert "[  6/6] trial   5 sampled  FAILED: MemoryError: out of memory" in text  # the plain lines stay
    assert "[  1/6] trial   0 sampled  ppl" in text


def test_no_live_panel_where_the_stream_is_not_a_terminal():
    p = Progress(total=2, already_done=0, stream=io.StringIO())
    assert p.live is None
    p.close()
