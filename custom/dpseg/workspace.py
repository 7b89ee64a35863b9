"""NVFlare workspace preparation (``dpseg init-workspace``): allow the installed ``dpseg``
components, and keep the site's job logs at the site.

NVFlare builds only component classes on a site's class allow-list (``class_allow_list`` in the
site's ``local/resources.json``); jobs that bring no code (no BYOC) may use nothing else. Sites
install this package and add the prefix ``dpseg.`` to that list, keeping NVFlare's own entries.

NVFlare 2.9 streams a site's job log to the server unless the site's ``local/resources.json`` sets
``allow_log_streaming`` to false (``nvflare.app_common.logging.constants``; provisioned kits also
carry a ``SiteLogStreamer`` that would add a ``JobLogStreamer`` to every job). A site's log names
its files and may say more about its data than the job sends, so it stays at the site.

The same applies to a simulator workspace, whose ``local/`` folder NVFlare copies to every
simulated site and to the server.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from nvflare.app_common.logging.constants import ALLOW_LOG_STREAMING_VAR

ALLOW_PREFIX = "dpseg."


def init_workspace(workspace: Path) -> Path:
    """``allow_dpseg`` and ``keep_logs_at_site``; returns ``<workspace>/local/resources.json``."""
    allow_dpseg(workspace)
    return keep_logs_at_site(workspace)


def allow_dpseg(workspace: Path) -> Path:
    """Write ``<workspace>/local/resources.json`` with ``dpseg.`` on the class allow-list."""

    def change(resources: dict) -> None:
        allow = list(resources.get("class_allow_list", DEFAULT_CLASS_ALLOW_LIST))
        if ALLOW_PREFIX not in allow:
            allow.append(ALLOW_PREFIX)
        resources["class_allow_list"] = allow

    return _update_resources(workspace, change)


def keep_logs_at_site(workspace: Path) -> Path:
    """Write ``<workspace>/local/resources.json`` with NVFlare's job log streaming off."""
    return _update_resources(workspace, lambda resources: resources.update({ALLOW_LOG_STREAMING_VAR: False}))


def _update_resources(workspace: Path, change: Callable[[dict], None]) -> Path:
    """Apply ``change`` to the settings of ``<workspace>/local/resources.json`` (or else of
    ``resources.json.default``, or none) and write them to ``resources.json``; the rest is kept."""
    local = Path(workspace) / "local"
    local.mkdir(parents=True, exist_ok=True)
    target = local / "resources.json"
    source = target if target.exists() else local / "resources.json.default"
    resources = {}
    if source.exists():
        try:
            resources = json.loads(source.read_text())
        except ValueError as err:
            raise ValueError(f"{source} is not valid JSON: {err}") from None
    change(resources)
    target.write_text(json.dumps(resources, indent=2) + "\n")
    return target


def write_site_settings(kit: Path, settings: dict) -> Path:
    """Write a site's own settings (data location, ledger, policy) into ``<kit>/local/dpseg_site.json``,
    keeping keys already there that ``settings`` does not set. Refused (SiteConfigError) while the
    file holds a setting that is no longer read."""
    from dpseg.site import SITE_FILE, check_retired

    target = Path(kit) / SITE_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    current = json.loads(target.read_text()) if target.exists() else {}
    check_retired(current, str(target))
    current.update({k: v for k, v in settings.items() if v is not None})
    target.write_text(json.dumps(current, indent=2) + "\n")
    return target
