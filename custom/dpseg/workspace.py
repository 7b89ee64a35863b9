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

The shipped jobs' apps carry a ``custom/`` folder without code, so that ``nvflare simulator`` runs
them on a new workspace: NVFlare does not apply the allow-list to a job with a ``custom/`` folder
("bring your own code", which a provisioned site grants per role). dpseg's components therefore
apply it themselves (``allow_list_refusal``), before they do anything, with NVFlare's own rules: a
site or server whose allow-list does not name them refuses the job, with the command that fixes it.
The one exception is a simulator workspace without any ``local/resources.json`` (or
``resources.json.default``): no site policy is configured there, and NVFlare's built-in default list
knows only NVFlare's classes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from nvflare.apis.fl_constant import WorkspaceConstants
from nvflare.apis.fl_exception import UnsafeComponentError
from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from nvflare.app_common.logging.constants import ALLOW_LOG_STREAMING_VAR
from nvflare.private.fed.simulator.simulator_const import SimulatorConstants

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


def resources_file(workspace: Path) -> Path | None:
    """The site's resources file, where NVFlare looks for it: ``local/resources.json``, else
    ``local/resources.json.default``; None if neither exists."""
    local = Path(workspace) / WorkspaceConstants.SITE_FOLDER_NAME
    for name in (WorkspaceConstants.RESOURCES_CONFIG, WorkspaceConstants.DEFAULT_RESOURCES_CONFIG):
        if (local / name).is_file():
            return local / name
    return None


def component_paths(config) -> list[str]:
    """Every component class path (``path`` / ``class_path``) in a job config, nested ones included."""
    found: list[str] = []
    if isinstance(config, dict):
        for key in ("path", "class_path"):
            if isinstance(config.get(key), str):
                found.append(config[key])
        for value in config.values():
            found += component_paths(value)
    elif isinstance(config, list):
        for item in config:
            found += component_paths(item)
    return found


class _SitePolicy:
    """What NVFlare's ComponentPathAuthorizer asks of a workspace: where its resources file is."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def get_resources_file_path(self) -> str | None:
        found = resources_file(self.root)
        return str(found) if found else None

    def get_root_dir(self) -> str:
        return str(self.root)


def allow_list_refusal(site: str, workspace: Path, app_config: Path, job_id: str) -> str | None:
    """Why ``site`` (workspace root ``workspace``) must refuse the job whose deployed app config is
    ``app_config``, or None if its class allow-list allows every component the config names.

    The rules are NVFlare's (``ComponentPathAuthorizer``: the site's resources file, else NVFlare's
    loaded site configuration or built-in default list; ``*``; the ``warn`` enforcement mode),
    applied to the whole config, as NVFlare applies them to a job without a ``custom/`` folder. In
    the simulator (job id ``simulate_job``), a site without any resources file has no policy and
    allows everything. The answer is one sentence that names the file and the command to run.
    """
    from nvflare.app_common.widgets.component_path_authorizer import ComponentPathAuthorizer

    simulator = job_id == SimulatorConstants.JOB_NAME
    policy = resources_file(workspace)
    if policy is None and simulator:
        return None
    config = json.loads(Path(app_config).read_text()) if Path(app_config).is_file() else {}
    authorizer = ComponentPathAuthorizer()
    # in the simulator every site's local/ is a copy of the workspace's: that is where to change it
    target = Path(workspace).parent if simulator else Path(workspace)
    where = str(policy) if policy else "NVFlare's default list"
    for path in component_paths(config):
        try:
            authorizer.authorize_component_config({"path": path}, workspace=_SitePolicy(workspace))
        except (UnsafeComponentError, ValueError) as err:
            if "is not in allow_list" not in str(err):
                return f"{site} cannot read its class allow-list ({where}): {err}; fix that file"
            if path.startswith(ALLOW_PREFIX):
                return (f"{site} refuses this job: its class allow-list ({where}) does not allow dpseg's "
                        f"components; run `dpseg init-workspace {target}` to allow them")
            return (f"{site} refuses this job: its class allow-list ({where}) does not allow {path}; add it to "
                    f"class_allow_list in {target}/local/resources.json to run this job")
    return None
