from dpseg.tools.bench import peak_memory, round_breakdown, step_time_ratios


def test_bench_reports_a_ratio_for_every_working_mode():
    out = step_time_ratios(batch_size=2, repeats=1, memory=False)
    modes = {m["mode"]: m for m in out["modes"]}
    assert set(modes) == {"plain", "fast", "hooks", "functorch", "ew", "ghost"}
    assert modes["plain"]["ratio_to_non_dp"] == 1.0
    for name in ("fast", "hooks", "functorch"):
        assert modes[name]["median_s"] > 0 and modes[name]["ratio_to_non_dp"] > 0
    for name in ("ew", "ghost"):  # each either runs or says why not
        assert "error" in modes[name] or modes[name]["median_s"] > 0
    noise = out["noise"]  # one step's secure noise, beside the seeded draw it replaced
    assert noise["coordinates"] > 100_000 and noise["secure_ms"] > 0 and noise["seeded_torch_ms"] > 0


def test_peak_memory_of_a_mode_in_its_own_process():
    mem = peak_memory("fast", batch_size=2, threads=1)
    assert mem["error"] is None and mem["rss_before_mb"] > 100 and mem["step_mb"] > 0


def test_attack_time_reads_the_audit_jobs_default_attack():
    from dpseg.tools.bench import attack_time

    out = attack_time({"iterations": 2, "restarts": 1, "prior_components": 8, "refine_iterations": 1, "noise": 0.0},
                      prior_patients=(3,))
    assert out["attack"]["prior"] == "synthetic" and out["attack"]["iterations"] == 2
    assert out["attack"]["noise_draws"] == 4 and out["attack"]["prior_candidates"] == 20  # the job's, not overridden
    assert out["attack"]["warp_grid"] == 6
    assert out["seconds_per_update"] > 0 and out["prior_build_seconds"] > 0
    assert out["seconds_per_iteration"] == out["seconds_per_update"] / 3
    assert 0 < out["informed_seconds_per_candidate"] < out["seconds_per_update"]


def test_a_round_is_the_slowest_sites_training_and_validation_plus_communication():
    rounds = [{"round": 0, "seconds": 30.0, "sites": {"site-1": {}, "site-2": {}}},
              {"round": 1, "seconds": 20.0, "sites": {"site-1": {}}}]
    own = {("site-1", 0): {"train_seconds": 10.0, "validation_seconds": 5.0},
           ("site-2", 0): {"train_seconds": 18.0, "validation_seconds": 4.0},
           ("site-1", 1): {"train_seconds": 12.0}}  # an older record without validation time
    first, second = round_breakdown(rounds, own)
    assert (first["train_s"], first["validation_s"], first["communication_s"]) == (18.0, 4.0, 8.0)
    assert (second["train_s"], second["validation_s"], second["communication_s"]) == (12.0, None, 8.0)
    assert round_breakdown([{"round": 2, "seconds": 5.0, "sites": {}}], own)[0]["communication_s"] is None
