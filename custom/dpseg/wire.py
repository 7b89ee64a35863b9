"""Names that site code, server code and the tools reading their output share, and the site's
error codes.

A site that cannot do a task replies with an NVFlare error return code and ERROR_HEADER set to
``"<code>: <sentence>"``: a code of SITE_ERRORS and its fixed, generic sentence. The details (files,
patients, HU ranges, label values, budgets) go to the site's own log only: an error header is not
covered by the DP guarantee, so it carries nothing that depends on the site's data.
"""

from __future__ import annotations

ERROR_HEADER = "dpseg_error"
# the audit job's task (training and validation use NVFlare's AppConstants.TASK_TRAIN / TASK_VALIDATION)
AUDIT_TASK = "audit"
# files the server writes into its run folder (read by dpseg report, resume-job and the study)
ROUNDS_FILE = "dpseg_rounds.json"  # dpseg.server.RoundRecorder: per round and site, what came with the update
REJECTED_FILE = "dpseg_rejected.json"  # dpseg.validation.UpdateValidator: updates refused
AUDIT_FILE = "dpseg_audit.json"  # dpseg.auditjob.AuditController: the sites' audit acknowledgements
RESUME_FILE = "dpseg_resume.pt"  # dpseg.server.BundlePersistor: the resume point
BUNDLE_OUT = "bundle"  # dpseg.server.BundlePersistor: the job's model as a copy of the bundle
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
