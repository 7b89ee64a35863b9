"""Names that site code, server code and the tools reading their output share, and the site's
error codes.

A site that cannot do a task replies with an NVFlare error return code and ERROR_HEADER set to
``"<code>: <sentence>"``: a code of SITE_ERRORS and its fixed, generic sentence. The details (files,
patients, HU ranges, label values, budgets) go to the site's own log only: an error header is not
covered by the DP guarantee, so it carries nothing that depends on the site's data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

ERROR_HEADER = "dpseg_error"
# the audit job's task (training and validation use NVFlare's AppConstants.TASK_TRAIN / TASK_VALIDATION)
AUDIT_TASK = "audit"
# files the server writes into its run folder (read by dpseg report, resume-job and the study)
ROUNDS_FILE = "dpseg_rounds.json"  # dpseg.server.RoundRecorder: per round and site, what came with the update
REJECTED_FILE = "dpseg_rejected.json"  # dpseg.updatefilter.UpdateFilter: updates refused
AUDIT_FILE = "dpseg_audit.json"  # dpseg.auditjob.AuditController: the sites' audit acknowledgements
RESUME_FILE = "dpseg_resume.pt"  # dpseg.server.BundlePersistor: the resume point
BUNDLE_OUT = "bundle"  # dpseg.server.BundlePersistor: the job's model as a copy of the bundle
UPDATE_SUMS_FILE = "dpseg_update_sums.npz"  # dpseg.updatesums.UpdateSums: each site's updates summed (audit copies)
# per round, the site's own record of its training time and memory (in its job folder; never sent)
SITE_ROUNDS_FILE = "dpseg_site_rounds.json"
SITE_ERRORS = {
    "data": "the site's data failed its checks; no training (the site's log names the problems)",
    "config": "the site's settings are missing or wrong (the site's log says which)",
    "privacy": "the site refused the task: its privacy budget or policy, or the job's privacy settings "
               "(the site's log says which)",
    "audit": "the site could not audit this update (the site's log says why)",
}


def error_header(code: str) -> str:
    """The ERROR_HEADER value of a site error ``code`` (a key of SITE_ERRORS)."""
    return f"{code}: {SITE_ERRORS[code]}"


# the meta keys of an update (beside NVFlare's own): its privacy facts and its public training settings
PRIVACY_META = "privacy"
TRAINING_META = "training"


@dataclass(frozen=True)
class PrivacyMeta:
    """What a site sends about its privacy with every update (meta ``PRIVACY_META``); the server's
    update filter, the round recorder, the report, resume-job, the study and the audit read it.

    dp: trained with DP; unit: the privacy unit ("patient"); without DP nothing else. With DP:
    adjacency (the neighbouring relation the accountant bounds), epsilon (spent so far in the job,
    patient level), delta, target_epsilon, noise_multiplier, sample_rate (public Poisson rate per
    patient), steps (so far) and planned_steps (the job's), max_grad_norm (L2 clip), batch_size
    (the public expected batch), accountant ("prv" or "rdp"), ledger_entry (the site's ledger
    entry of this job, which resume-job continues)."""

    dp: bool
    unit: str = "patient"
    adjacency: str | None = None
    epsilon: float | None = None
    delta: float | None = None
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    planned_steps: int | None = None
    max_grad_norm: float | None = None
    batch_size: int | None = None
    accountant: str | None = None
    ledger_entry: str | None = None

    def __post_init__(self):
        kinds = {"dp": bool, "unit": str, "adjacency": str, "accountant": str, "ledger_entry": str,
                 "steps": int, "planned_steps": int, "batch_size": int}
        for f in fields(self):
            value = getattr(self, f.name)
            kind = kinds.get(f.name, float)
            if value is None and f.name != "dp":
                continue
            ok = isinstance(value, str) if kind is str else isinstance(value, bool) if kind is bool else \
                isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
            if not ok:
                raise ValueError(f"privacy meta: {f.name} must be a {kind.__name__}, got {value!r}")
        if self.dp and any(getattr(self, k) is None for k in ("epsilon", "delta", "noise_multiplier", "sample_rate",
                                                              "steps")):
            raise ValueError("privacy meta of a DP update without its epsilon, delta, noise, sample rate or steps")

    def to_dict(self) -> dict:
        """The meta as sent: every field that is set."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, value: object) -> "PrivacyMeta":
        """The meta a site sent; ValueError naming the problem where it is not one (not a mapping,
        an unknown key, a value of the wrong type, a DP update without its facts)."""
        if not isinstance(value, dict):
            raise ValueError(f"privacy meta must be a mapping, got {type(value).__name__}")
        if unknown := sorted(set(value) - {f.name for f in fields(cls)}):
            raise ValueError(f"privacy meta: unknown key(s) {unknown[:3]}")
        if "dp" not in value:
            raise ValueError("privacy meta without 'dp'")
        return cls(**value)
