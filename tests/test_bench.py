from dpseg.bench import step_time_ratios


def test_bench_reports_a_ratio_for_every_working_mode():
    out = step_time_ratios(batch_size=2, repeats=1)
    modes = {m["mode"]: m for m in out["modes"]}
    assert set(modes) == {"plain", "fast", "hooks", "functorch", "ew"}
    assert modes["plain"]["ratio_to_non_dp"] == 1.0
    for name in ("fast", "hooks", "functorch"):
        assert modes[name]["median_s"] > 0 and modes[name]["ratio_to_non_dp"] > 0
    assert "error" in modes["ew"] or modes["ew"]["median_s"] > 0
