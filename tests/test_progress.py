"""The progress meter reports rates and ETA over recent steps, not since the start."""
from vlmkit.progress import Meter, format_seconds


def test_rates_and_eta_follow_the_recent_steps():
    now = [0.0]
    m = Meter(total=100, window=4, peak=1e12, clock=lambda: now[0])
    assert m.rates() == {} and m.eta() is None
    now[0] = 60.0  # a slow first step (compilation, cold workers)
    m.update(samples=16, tokens=16_000, flops=1e12, llm_flops=8e11)
    for _ in range(8):  # then 2 s per step
        now[0] += 2.0
        m.update(samples=16, tokens=16_000, flops=1e12, llm_flops=8e11)
    r = m.rates()
    assert r["samples_per_second"] == 8.0 and r["tokens_per_second"] == 8000.0 and r["seconds_per_step"] == 2.0
    assert r["mfu"] == 0.5 and r["mfu_llm"] == 0.4
    assert m.eta() == (100 - 9) * 2.0
    assert "8.0 samples/s" in m.postfix(1.25) and "ETA 03:02" in m.postfix(1.25) and "MFU 0.50" in m.postfix(1.25)


def test_no_mfu_without_a_peak_and_resumed_start():
    now = [0.0]
    m = Meter(total=10, start=7, peak=None, clock=lambda: now[0])
    now[0] = 3.0
    m.update(4, 400)
    assert "mfu" not in m.rates() and m.eta() == (10 - 8) * 3.0
    assert format_seconds(3725) == "1:02:05" and format_seconds(None) == "?"
