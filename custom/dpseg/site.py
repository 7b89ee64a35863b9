"""A site's own settings: where its data is, where its privacy ledger is, and its policy for jobs.

They belong to the site, never to the job or the server: nothing a job says can change them. Read,
in order of precedence, from environment variables of the site's client process and from
``<site workspace>/local/dpseg_site.json`` (the startup kit's ``local/`` folder, which the site
controls):

======================  ==========================  =============================================
environment variable    key in dpseg_site.json      meaning
======================  ==========================  =============================================
DPSEG_DATALIST          datalist                    the site's datalist ("{site}" is replaced by
                                                    the site's name)
DPSEG_DATA_ROOT         data_root                   else: <data_root>/<site>/datalist.json
DPSEG_LEDGER            ledger                      the site's privacy ledger ("{site}" replaced);
                                                    required for DP jobs, created once with
                                                    ``dpseg ledger init`` (it holds the totals)
DPSEG_REQUIRE_DP        require_dp                  1 / true: refuse every job without DP
DPSEG_MAX_JOB_EPSILON   max_job_epsilon             refuse a DP job whose target epsilon is higher
======================  ==========================  =============================================

The site's total budget is no site setting: it lives in the ledger file. ``DPSEG_TOTAL_EPSILON`` /
``total_epsilon`` (where it used to be) are refused, so that nobody believes they are in force.

One more, read on its own by ``audit_release``: ``DPSEG_AUDIT_RELEASE`` / ``audit_release``, what the
site's audits may send to the server (``none``, the default: nothing about its training slices;
``aggregate``: means over its audited updates, NOT DP-protected; see ``dpseg.auditresults``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from dpseg.simulator import SIMULATOR_JOB_ID

SITE_FILE = Path("local") / "dpseg_site.json"
ENV = {"datalist": "DPSEG_DATALIST", "data_root": "DPSEG_DATA_ROOT", "ledger": "DPSEG_LEDGER",
       "require_dp": "DPSEG_REQUIRE_DP", "max_job_epsilon": "DPSEG_MAX_JOB_EPSILON"}
RETIRED = {"total_epsilon": "DPSEG_TOTAL_EPSILON"}
# the total delta of a new ledger unless `dpseg ledger init --total-delta` says otherwise: ten jobs
# at the jobs' default delta 1e-5 (kept here, not in dpseg.ledger, so the CLI builds without torch)
DEFAULT_TOTAL_DELTA = 1e-4
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no", "")


class SiteConfigError(RuntimeError):
    """A site setting is missing or wrong; the message names the setting."""


class JobRefused(SiteConfigError):
    """The site's policy refuses this job; the message names the setting."""


@dataclass(frozen=True)
class SiteSettings:
    """site: its name; datalist: its datalist file; ledger: its privacy ledger file (None where
    none is configured: jobs without DP only); require_dp: refuse jobs without DP;
    max_job_epsilon: the highest target epsilon a DP job may have here (None: no cap)."""

    site: str
    datalist: Path
    ledger: Path | None
    require_dp: bool = False
    max_job_epsilon: float | None = None


def ledger_init_command(path: Path | str) -> str:
    """The command that creates the site's ledger at ``path`` (for error messages)."""
    return f"dpseg ledger init {path} --total-epsilon E [--total-delta D]"


def check_retired(values: dict, where: str) -> None:
    """Refuse (SiteConfigError) a setting that is no longer read: the environment, or the
    ``values`` of the site file named ``where``."""
    for key, var in RETIRED.items():
        found = var if os.environ.get(var) else (f"'{key}' in {where}" if key in values else None)
        if found:
            raise SiteConfigError(f"{found} is no longer read: the site's budget now lives in its privacy ledger "
                                  f"(`{ledger_init_command('PATH')}`); remove it")


def _file_settings(workspace_root: Path | None) -> tuple[dict, str]:
    if workspace_root is None:
        return {}, ""
    path = Path(workspace_root) / SITE_FILE
    if not path.exists():
        return {}, str(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SiteConfigError(f"site settings file {path} is unreadable: {err}") from None
    if not isinstance(data, dict):
        raise SiteConfigError(f"site settings file {path} must hold a JSON object")
    return data, str(path)


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise SiteConfigError(f"site setting {name}={value!r} must be true or false (1 / 0)")


def _cap(value, name: str) -> float | None:
    if value is None:
        return None
    try:
        cap = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        cap = math.nan
    if not 0 < cap < math.inf:
        raise SiteConfigError(f"site setting {name}={value!r} must be a number > 0")
    return cap


def load_site_settings(site: str, workspace_root: Path | None = None, synthetic_root: Path | None = None,
                       require_ledger: bool = True, edited_in: Path | None = None) -> SiteSettings:
    """Resolve the site's settings; ``synthetic_root`` is used only when the job asks for synthetic
    data. ``require_ledger`` (a DP job): the ledger must be configured and exist. ``edited_in``:
    the workspace whose ``local/dpseg_site.json`` the messages name, where it is not
    ``workspace_root``'s (the simulator copies its workspace's ``local/`` to every site)."""
    file_values, file_name = _file_settings(workspace_root)
    check_retired(file_values, file_name)
    if edited_in is not None:
        file_name = str(Path(edited_in) / SITE_FILE)

    def get(key: str):
        return os.environ.get(ENV[key]) or file_values.get(key)

    def named(key: str) -> str:
        return ENV[key] + (f" / '{key}' in {file_name}" if file_name else "")

    where = f"set {ENV['datalist']} or {ENV['data_root']}" + (f", or '{'datalist'}' in {file_name}" if file_name else "")
    if synthetic_root is not None:
        datalist = Path(synthetic_root) / site / "datalist.json"
    elif get("datalist"):
        datalist = Path(str(get("datalist")).replace("{site}", site))
    elif get("data_root"):
        datalist = Path(get("data_root")) / site / "datalist.json"
    else:
        raise SiteConfigError(f"site {site} has no data configured: {where}")
    if synthetic_root is None and not datalist.is_file():
        raise SiteConfigError(f"site {site}: datalist {datalist} does not exist (from {where.replace('set ', '')})")
    ledger = Path(str(get("ledger")).replace("{site}", site)) if get("ledger") else None
    if require_ledger and ledger is None:
        raise SiteConfigError(f"site {site} has no privacy ledger configured, which a DP job needs: set "
                              f"{named('ledger')}, created once with `{ledger_init_command('PATH')}`")
    if require_ledger and not ledger.is_file():
        raise SiteConfigError(f"site {site}: privacy ledger {ledger} (from {named('ledger')}) does not exist; "
                              f"create it once with `{ledger_init_command(ledger)}`")
    return SiteSettings(site, datalist, ledger, _flag(get("require_dp") or False, named("require_dp")),
                        _cap(get("max_job_epsilon"), named("max_job_epsilon")))


def check_job_policy(settings: SiteSettings, dp: bool, target_epsilon: float) -> None:
    """Refuse (JobRefused) a job that the site's policy does not allow: one without DP where the
    site requires DP, or a DP job whose target epsilon (patient level, over the whole job) is above
    the site's cap. Only the site's settings count: nothing in the job can change them."""
    if settings.require_dp and not dp:
        raise JobRefused(f"site {settings.site} requires differential privacy ({ENV['require_dp']} / "
                         "'require_dp'): this job trains without DP and is refused")
    cap = settings.max_job_epsilon
    if dp and cap is not None and target_epsilon > cap:
        raise JobRefused(f"site {settings.site} accepts DP jobs of target epsilon at most {cap:g} "
                         f"({ENV['max_job_epsilon']} / 'max_job_epsilon'); this job asks for {target_epsilon:g}: refused")


THREADS_ENV = "DPSEG_TORCH_THREADS"


def torch_threads(job_id: str) -> int | None:
    """CPU threads for torch: ``$DPSEG_TORCH_THREADS`` if set (a site setting); in the NVFlare
    simulator, where every site shares one machine, 1 per site; else torch's default (None)."""
    configured = os.environ.get(THREADS_ENV)
    if configured:
        try:
            return max(1, int(configured))
        except ValueError:
            raise SiteConfigError(f"{THREADS_ENV}={configured!r} is not an integer") from None
    return 1 if job_id == SIMULATOR_JOB_ID else None


AUDIT_PRIOR_ENV = "DPSEG_AUDIT_PRIOR_DIR"
AUDIT_PRIOR_KEY = "audit_prior_dir"
AUDIT_PRIOR_DIR = "audit_prior"


def audit_prior_dir(workspace_root: Path) -> Path:
    """Where the site keeps the attacker's public prior that its audits build once
    (``dpseg.prior``): ``$DPSEG_AUDIT_PRIOR_DIR``, else ``audit_prior_dir`` in
    ``<workspace_root>/local/dpseg_site.json``, else ``<workspace_root>/audit_prior``. The prior is
    built from public (synthetic) images only, so a folder shared by several workspaces (every
    simulator run of a study) holds nothing of a site's patients."""
    file_values, _ = _file_settings(workspace_root)
    value = os.environ.get(AUDIT_PRIOR_ENV) or file_values.get(AUDIT_PRIOR_KEY)
    return Path(value) if value else Path(workspace_root) / AUDIT_PRIOR_DIR


AUDIT_RELEASE_ENV = "DPSEG_AUDIT_RELEASE"
AUDIT_RELEASE_KEY = "audit_release"


def audit_release(workspace_root: Path | None = None) -> str:
    """The site's choice of what its audits send to the server: ``$DPSEG_AUDIT_RELEASE``, else
    ``audit_release`` in ``<workspace_root>/local/dpseg_site.json``, else ``"none"``. One of
    ``dpseg.auditresults.RELEASE_CHOICES``; anything else raises SiteConfigError naming the setting."""
    from dpseg.auditresults import RELEASE_CHOICES, RELEASE_NONE

    file_values, file_name = _file_settings(workspace_root)
    if os.environ.get(AUDIT_RELEASE_ENV):
        value, where = os.environ[AUDIT_RELEASE_ENV], AUDIT_RELEASE_ENV
    else:
        value, where = file_values.get(AUDIT_RELEASE_KEY, RELEASE_NONE), f"'{AUDIT_RELEASE_KEY}' in {file_name}"
    if value not in RELEASE_CHOICES:
        raise SiteConfigError(f"{where}={value!r}: must be one of {', '.join(RELEASE_CHOICES)}")
    return value
