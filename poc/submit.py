"""Submit a job to the running POC as its project admin, wait for it, download the result and
print the dpseg report.

    NVFLARE_POC_WORKSPACE=/tmp/dpseg_poc python poc/submit.py jobs/fed_dp [--out results] [--timeout 3600]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nvflare.fuel.flare_api.flare_api import new_secure_session

from dpseg.cli import main as dpseg_main


def admin_kit(workspace: Path) -> Path:
    kits = sorted(workspace.glob("*/prod_00/admin@*"))
    if not kits:
        raise SystemExit(f"error: no admin startup kit under {workspace}/*/prod_00: run poc/prepare.sh first")
    return kits[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", help="job folder, e.g. jobs/fed_dp")
    parser.add_argument("--out", default="poc_results", help="where to download the job's result")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the job")
    args = parser.parse_args()
    workspace = Path(os.environ.get("NVFLARE_POC_WORKSPACE", ""))
    if not workspace.is_dir():
        raise SystemExit("error: set NVFLARE_POC_WORKSPACE to the POC folder prepared by poc/prepare.sh")
    kit = admin_kit(workspace)
    session = new_secure_session(kit.name, str(kit), timeout=60)
    try:
        job_id = session.submit_job(str(Path(args.job).absolute()))
        print(f"submitted {args.job} as job {job_id}; waiting", flush=True)
        _, meta = session.monitor_job_and_return_job_meta(job_id, timeout=args.timeout)
        status = (meta or {}).get("status")
        print(f"job {job_id}: {status}", flush=True)
        result = session.download_job_result(job_id, destination=args.out)
        print(f"result downloaded to {result}", flush=True)
    finally:
        session.close()
    report_status = dpseg_main(["report", result])
    return 0 if status == "FINISHED:COMPLETED" and report_status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
