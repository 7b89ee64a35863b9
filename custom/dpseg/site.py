"""A site's own settings: where its data is, where its privacy ledger is, its total budget.

They belong to the site, never to the job or the server. Read, in order of precedence, from
environment variables of the site's client process and from ``<site workspace>/local/dpseg_site.json``
(the startup kit's ``local/`` folder, which the site controls):

=====================  ==========================  ==============================================
environment variable   key in dpseg_site.json      meaning
=====================  ==========================  ==============================================
DPSEG_DATALIST         datalist                    the site's datalist ("{site}" is replaced by
                                                   the site's name)
DPSEG_DATA_ROOT        data_root                   else: <data_root>/<site>/datalist.json
DPSEG_LEDGER           ledger                      privacy ledger ("{site}" replaced; default:
                                                   ``privacy_ledger.json`` beside the datalist)
DPSEG_TOTAL_EPSILON    total_epsilon               the site's total epsilon budget across jobs
=====================  ==========================  ==============================================

One more, read on its own by ``audit_release``: ``DPSEG_AUDIT_RELEASE`` / ``audit_release``, what the
site's audits may send to the server (``none``, the default: nothing about its training slices;
``aggregate``: means over its audited updates, NOT DP-protected; see ``dpseg.auditresults``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

SITE_FILE = Path("local") / "dpseg_site.json"
ENV = {"datalist": "DPSEG_DATALIST", "data_root": "DPSEG_DATA_ROOT", "ledger": "DPSEG_LEDGER",
       "total_epsilon": "DPSEG_TOTAL_EPSILON"}


class SiteConfigError(RuntimeError):
    """A site setting is missing or wrong; the message names the setting."""


@dataclass(frozen=True)
class SiteSettings:
    site: str
    datalist: Path
    ledger: Path
    total_epsilon: float | None


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


def load_site_settings(site: str, workspace_root: Path | None = None, synthetic_root: Path | None = None,
                       require_budget: bool = True) -> SiteSettings:
    """Resolve the site's settings; ``synthetic_root`` is used only when the job asks for synthetic data."""
    file_values, file_name = _file_settings(workspace_root)

    def get(key: str):
        return os.environ.get(ENV[key]) or file_values.get(key)

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
    ledger = Path(str(get("ledger")).replace("{site}", site)) if get("ledger") else datalist.parent / "privacy_ledger.json"
    budget = get("total_epsilon")
    if budget is None and require_budget:
        raise SiteConfigError(f"site {site} has no privacy budget: set {ENV['total_epsilon']}"
                              + (f" or 'total_epsilon' in {file_name}" if file_name else ""))
    try:
        total = float(budget) if budget is not None else None
    except ValueError:
        raise SiteConfigError(f"site {site}: {ENV['total_epsilon']}={budget!r} is not a number") from None
    return SiteSettings(site, datalist, ledger, total)


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
