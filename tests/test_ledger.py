import json
import multiprocessing

import pytest

from conftest import run_cli
from dpseg.ledger import Ledger, lock_path
from dpseg.privacy import Accountant, PrivacyError, PrivacyPlan, calibrate


def settings(epsilon: float, delta: float = 1e-5, accountant: str = "rdp") -> PrivacyPlan:
    """A job's privacy settings as the ledger sees them (no calibration needed)."""
    return PrivacyPlan(target_epsilon=epsilon, delta=delta, max_grad_norm=1.0, batch_size=16,
                           sample_rate=16 / 84, steps=10, accountant=accountant, noise_multiplier=1.0)


def test_a_ledger_is_created_with_its_totals_and_never_overwritten(tmp_path):
    path = tmp_path / "ledgers" / "site-1.json"
    Ledger.create(path, 10.0, 2e-5)
    ledger = Ledger.open(path)
    assert (ledger.total_epsilon, ledger.total_delta, ledger.jobs) == (10.0, 2e-5, {})
    ledger.reserve("job-a", settings(4.0))
    with pytest.raises(PrivacyError, match="exists already; it is never overwritten"):
        Ledger.create(path, 1000.0)
    assert list(Ledger.open(path).jobs) == ["job-a"]
    for bad in ((0.0, 1e-5), (10.0, 0.0), (10.0, 1.0), (float("inf"), 1e-5)):
        with pytest.raises(PrivacyError, match="need total epsilon > 0 and 0 < total delta < 1"):
            Ledger.create(tmp_path / "other.json", *bad)


def test_a_missing_ledger_is_an_error_naming_the_path_and_the_init_command_never_zero(tmp_path):
    path = tmp_path / "moved" / "site-1.json"
    with pytest.raises(PrivacyError, match=f"{path} does not exist.*dpseg ledger init {path} --total-epsilon"):
        Ledger.open(path)
    assert not path.parent.exists()


def test_the_totals_are_covered_by_the_checksum(tmp_path):
    path = tmp_path / "l.json"
    Ledger.create(path, 10.0)
    path.write_text(path.read_text().replace('"total_epsilon": 10.0', '"total_epsilon": 100.0'))
    with pytest.raises(PrivacyError, match="does not match its checksum"):
        Ledger.open(path)


def test_an_old_ledger_without_totals_stops_training_and_is_kept(tmp_path):
    path = tmp_path / "l.json"
    old = json.dumps({"jobs": {}, "sha256": "0" * 64})
    path.write_text(old)
    with pytest.raises(PrivacyError, match="holds no totals"):
        Ledger.open(path)
    assert path.read_text() == old


def test_ledger_accumulates_and_refuses_past_the_total_epsilon(tmp_path):
    path = tmp_path / "ledger.json"
    Ledger.create(path, total_epsilon=10.0)
    s = calibrate(4.0, 1e-5, 1.0, 16, 16 / 84, 30)
    ledger = Ledger.open(path)
    ledger.reserve("job-a", s)
    spent = Accountant(s)
    spent.step(30)
    ledger.record("job-a", spent)
    ledger = Ledger.open(path)  # a second job, later
    ledger.reserve("job-b", s)
    assert ledger.committed() == pytest.approx(8.0) and ledger.committed_delta() == pytest.approx(2e-5)
    assert ledger.spent()[0] == pytest.approx(spent.epsilon()) and 3.9 < spent.epsilon() <= 4.0
    with pytest.raises(PrivacyError, match="committed epsilon 8 of its total 10 .*job-c needs 4"):
        Ledger.open(path).reserve("job-c", s)
    assert "job-c" not in json.loads(path.read_text())["jobs"]


def test_a_job_is_refused_when_the_committed_delta_would_pass_the_total_delta(tmp_path):
    path = tmp_path / "l.json"
    Ledger.create(path, total_epsilon=100.0, total_delta=3e-5)
    ledger = Ledger.open(path)
    for job in ("job-a", "job-b", "job-c"):  # exactly the total (sums of floats round: still accepted)
        ledger.reserve(job, settings(1.0, delta=1e-5))
    with pytest.raises(PrivacyError, match="committed delta 3e-05 of its total 3e-05 .*job-d needs 1e-05"):
        ledger.reserve("job-d", settings(1.0, delta=1e-5))
    assert sorted(Ledger.open(path).jobs) == ["job-a", "job-b", "job-c"]


def test_reserving_the_same_job_twice_counts_once(tmp_path):
    Ledger.create(tmp_path / "l.json", 5.0)
    Ledger.open(tmp_path / "l.json").reserve("job-a", settings(4.0))
    Ledger.open(tmp_path / "l.json").reserve("job-a", settings(4.0))  # a resumed job
    assert Ledger.open(tmp_path / "l.json").committed() == pytest.approx(4.0)
    with pytest.raises(PrivacyError, match="already in the ledger .* with another target epsilon or delta"):
        Ledger.open(tmp_path / "l.json").reserve("job-a", settings(4.0, delta=1e-6))


def test_a_change_from_a_stale_copy_keeps_what_other_jobs_wrote_meanwhile(tmp_path):
    path = tmp_path / "l.json"
    Ledger.create(path, 10.0)
    first, second = Ledger.open(path), Ledger.open(path)  # two jobs, each with its copy of the empty ledger
    first.reserve("job-a", settings(8.0))
    with pytest.raises(PrivacyError, match="committed epsilon 8 of its total 10"):
        second.reserve("job-b", settings(8.0))  # decided on the file, not on its stale copy
    second.reserve("job-b", settings(2.0))
    spent = Accountant(settings(8.0))
    spent.step(3)
    first.record("job-a", spent)  # first's copy predates job-b
    first.note_continuation("job-a", "job-a2")
    jobs = Ledger.open(path).jobs
    assert sorted(jobs) == ["job-a", "job-b"] and jobs["job-a"]["steps"] == 3
    assert jobs["job-a"]["continued_by"] == ["job-a2"]


@pytest.mark.parametrize("damage", ["truncate", "edit", "garbage"])
def test_damaged_ledger_fails_closed_and_is_not_reset(tmp_path, damage):
    path = tmp_path / "ledger.json"
    Ledger.create(path, 10.0)
    ledger = Ledger.open(path)
    ledger.reserve("job-a", settings(4.0))
    text = path.read_text()
    if damage == "truncate":
        bad = text[: len(text) // 2]
    elif damage == "edit":
        bad = text.replace('"target_epsilon": 4.0', '"target_epsilon": 0.5')
        assert bad != text
    else:
        bad = "\x00\x01 not json"
    path.write_text(bad)
    with pytest.raises(PrivacyError, match="training stopped"):
        Ledger.open(path)
    with pytest.raises(PrivacyError, match="training stopped"):
        ledger.record("job-a", Accountant(settings(4.0)))  # a running job re-reads it too
    assert path.read_text() == bad


# ------------------------------------------------------------------- two real processes at once
def _reserve_8(path: str, job_id: str, barrier, results) -> None:
    """A job's process: open the ledger, wait for the other job, then reserve epsilon 8."""
    ledger = Ledger.open(path)
    barrier.wait()
    try:
        ledger.reserve(job_id, settings(8.0))
        results.put((job_id, "accepted"))
    except PrivacyError as err:
        results.put((job_id, str(err)))


def _reserve_and_record(path: str, prefix: str, count: int, barrier, results) -> None:
    """A job's process: ``count`` entries of its own, each reserved and then recorded (an
    accountant before its first step: no time spent computing epsilon, the writes come fast)."""
    ledger = Ledger.open(path)
    barrier.wait()
    for i in range(count):
        ledger.reserve(f"{prefix}-{i}", settings(0.5))
        ledger.record(f"{prefix}-{i}", Accountant(settings(0.5)))
    results.put(prefix)


def _race(target, args_of: list[tuple], timeout: float = 120) -> list:
    """Run ``target(*args, barrier, results)`` in one spawned process per ``args``, all released
    at once by a barrier; returns what they put in ``results``."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(args_of)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results)) for args in args_of]
    for p in procs:
        p.start()
    got = [results.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return got


def test_two_processes_reserving_at_once_never_pass_the_total_together(tmp_path):
    path = tmp_path / "l.json"
    Ledger.create(path, 10.0)
    outcomes = dict(_race(_reserve_8, [(str(path), "job-a"), (str(path), "job-b")]))
    accepted = [job for job, outcome in outcomes.items() if outcome == "accepted"]
    assert len(accepted) == 1, outcomes
    (refused,) = set(outcomes) - set(accepted)
    assert "privacy budget exceeded" in outcomes[refused]
    assert list(Ledger.open(path).jobs) == accepted and Ledger.open(path).committed() == 8.0


def test_concurrent_records_of_two_processes_lose_no_entry(tmp_path):
    path = tmp_path / "l.json"
    Ledger.create(path, 1000.0, 0.5)
    _race(_reserve_and_record, [(str(path), "job-a", 100), (str(path), "job-b", 100)])
    jobs = Ledger.open(path).jobs
    assert sorted(jobs) == sorted(f"job-{p}-{i}" for p in "ab" for i in range(100))
    assert all("accountant_state" in entry for entry in jobs.values())  # every record kept
    assert lock_path(path).exists()


def test_ledger_cli_creates_and_shows_a_ledger(tmp_path):
    path = tmp_path / "secure" / "site-1.json"
    made = run_cli("ledger", "init", str(path), "--total-epsilon", "12", "--total-delta", "5e-5")
    assert made.returncode == 0 and "total epsilon 12, total delta 5e-05" in made.stdout, made.stderr
    again = run_cli("ledger", "init", str(path), "--total-epsilon", "100")
    assert again.returncode == 2 and "never overwritten" in again.stderr
    assert Ledger.open(path).total_epsilon == 12.0
    Ledger.open(path).reserve("job-a", settings(3.0))
    shown = run_cli("ledger", "show", str(path))
    assert shown.returncode == 0, shown.stderr
    assert "total:     epsilon 12, delta 5e-05" in shown.stdout and "committed: epsilon 3," in shown.stdout
    assert "job-a: target epsilon 3 at delta 1e-05, spent 0 in 0 steps" in shown.stdout
    pattern = run_cli("ledger", "init", str(tmp_path / "{site}.json"), "--total-epsilon", "5")
    assert pattern.returncode == 2 and "give one site's ledger file" in pattern.stderr
