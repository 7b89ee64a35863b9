"""The bundle in a real MONAI Label server: place it in the ``monaibundle`` sample app, start the
server on 127.0.0.1 over a studies folder, and check it through the HTTP API.

MONAI Label lives in its own virtual environment (its own torch); this module only starts its
``monailabel`` launcher and talks HTTP, so it runs in the main environment. MONAI Label loads
weights with ``strict=False`` (a key mismatch only warns), so the check looks at the prediction:
its shape and affine against the input volume, and its Dice against the ground truth.

MONAI Label's environment has no dpseg: the bundle's plausibility check runs there from the
bundle's own ``scripts/`` (MONAI Label puts the bundle root on the path). Its report comes back in
the infer response's params (``liver_plausibility``); the check reads it for every patient and for
a head phantom, the wrong input, that it adds to the studies.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np

from dpseg.bundle import BUNDLE_NAME, Bundle, default_bundle_dir
from dpseg.datalist import resolve
from dpseg.metrics import dice
from dpseg.synthetic import head_phantom, write_nifti

HEAD_ID = "head_phantom"


class LabelServerError(RuntimeError):
    """The MONAI Label check failed; the message says at which step."""


def sample_app(venv: Path) -> Path:
    """The ``monaibundle`` sample app shipped inside the MONAI Label wheel of ``venv``."""
    for candidate in (Path(venv) / "monailabel" / "sample-apps" / "monaibundle",
                      *Path(venv).glob("lib/python*/site-packages/monailabel/sample-apps/monaibundle")):
        if (candidate / "main.py").is_file():
            return candidate
    raise LabelServerError(f"no monaibundle sample app in {venv}: is MONAI Label installed there?")


def prepare_app(venv: Path, work: Path, bundle_root: Path | None = None) -> Path:
    """A copy of the sample app with this project's bundle in ``model/<bundle name>/``."""
    app = Path(work) / "app"
    shutil.rmtree(app, ignore_errors=True)
    shutil.copytree(sample_app(venv), app, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(bundle_root or default_bundle_dir(), app / "model" / BUNDLE_NAME,
                    ignore=shutil.ignore_patterns("eval", "__pycache__"))
    return app


def prepare_studies(datalist: Path, work: Path, patients: int, split: str = "test") -> list[str]:
    """Copy ``patients`` images of a datalist split into ``work/studies`` (labels as final labels).
    Returns the image ids (file names without ``.nii.gz``)."""
    studies = Path(work) / "studies"
    (studies / "labels" / "final").mkdir(parents=True, exist_ok=True)
    ids = []
    for item in resolve(datalist, split)[:patients]:
        image_id = Path(item["image"]).name.removesuffix(".nii.gz")
        shutil.copy(item["image"], studies / f"{image_id}.nii.gz")
        shutil.copy(item["label"], studies / "labels" / "final" / f"{image_id}.nii.gz")
        ids.append(image_id)
    if not ids:
        raise LabelServerError(f"no '{split}' patients in {datalist}")
    return ids


def add_head_study(work: Path) -> str:
    """Write the head phantom (no label) into ``work/studies``; returns its image id."""
    hu, _, affine = head_phantom()
    write_nifti(np.rint(hu).astype(np.int16), affine, Path(work) / "studies" / f"{HEAD_ID}.nii.gz")
    return HEAD_ID


def split_multipart(body: bytes, content_type: str) -> dict[str, bytes]:
    """The parts of a ``multipart/form-data`` body by their field name (MONAI Label's ``output=all``
    answer: ``params`` as JSON, ``image`` as the label file)."""
    marker = "boundary="
    if not content_type.startswith("multipart/") or marker not in content_type:
        raise LabelServerError(f"expected a multipart answer, got Content-Type {content_type!r}")
    boundary = b"--" + content_type.split(marker, 1)[1].split(";")[0].strip().strip('"').encode()
    parts = {}
    for chunk in body.split(boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        name = next((h.split(b'name="', 1)[1].split(b'"', 1)[0] for h in head.split(b"\r\n")
                     if h.lower().startswith(b"content-disposition") and b'name="' in h), None)
        if name is not None:
            parts[name.decode()] = data.removesuffix(b"\r\n")
    return parts


def stop_process_group(proc: subprocess.Popen, grace: float) -> None:
    """Stop a process started with ``start_new_session=True`` and everything in its group:
    SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


class LabelServer:
    """A running ``monailabel start_server`` (its own process group); use as a context manager."""

    def __init__(self, venv: Path, app: Path, studies: Path, port: int, log: Path):
        self.venv, self.app, self.studies, self.port, self.log = Path(venv), app, studies, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "LabelServer":
        launcher = self.venv / "bin" / "monailabel"
        cmd = [str(launcher), "start_server", "--app", str(self.app), "--studies", str(self.studies),
               "--host", "127.0.0.1", "--port", str(self.port), "--conf", "models", BUNDLE_NAME,
               "--conf", "zoo_source", "local", "--conf", "sam2", "false"]
        # the launcher runs `python` from PATH: MONAI Label's environment must come first
        env = {**os.environ, "PATH": f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(cmd, cwd=self.app.parent, env=env, stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, grace=15)
        self.proc = None

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                timeout: float = 600) -> bytes:
        return self.exchange(method, path, body, content_type, timeout)[0]

    def exchange(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                 timeout: float = 600) -> tuple[bytes, str]:
        """The answer's body and its Content-Type."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.read(), response.headers.get("Content-Type", "")

    def wait_ready(self, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise LabelServerError(f"MONAI Label exited with code {self.proc.returncode}; see {self.log}")
            try:
                return json.loads(self.request("GET", "/info/", timeout=10))
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)
        raise LabelServerError(f"MONAI Label did not answer /info/ within {timeout} s; see {self.log}")

    def infer(self, model: str, image_id: str) -> tuple[bytes, dict]:
        """The label volume (NIfTI bytes) and the result params MONAI Label returns with it."""
        body, content_type = self.exchange("POST", f"/infer/{model}?image={image_id}&output=all",
                                           body=b"params=%7B%7D", content_type="application/x-www-form-urlencoded")
        parts = split_multipart(body, content_type)
        if "image" not in parts or "params" not in parts:
            raise LabelServerError(f"/infer/{model}?image={image_id}: the answer holds {sorted(parts)}, "
                                   "not an image and its params")
        return parts["image"], json.loads(parts["params"])

    def train(self, model: str, params: dict, timeout: float = 1200) -> dict:
        """Start a training task and wait for it; returns MONAI Label's last task status."""
        self.request("POST", f"/train/{model}", body=json.dumps(params).encode(), content_type="application/json")
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = json.loads(self.request("GET", "/train/", timeout=30))
            if status.get("status") in ("DONE", "ERROR", "STOPPED"):
                return status
            time.sleep(2)
        raise LabelServerError(f"/train/{model} did not finish within {timeout} s")


def model_labels(info: dict, model: str) -> list[str]:
    """Label names MONAI Label lists for ``model`` in its /info/ answer."""
    models = info.get("models", {})
    if model not in models:
        raise LabelServerError(f"/info/ does not list the model '{model}' (it lists {sorted(models)})")
    labels = models[model].get("labels", {})
    return sorted(labels if isinstance(labels, (dict, list)) else [])


def check(venv: Path, datalist: Path, work: Path, port: int, patients: int = 3, train_epochs: int = 1,
          progress=print) -> dict:
    """Run the whole check; returns its figures or raises LabelServerError naming the failed step."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    app = prepare_app(venv, work)
    ids = prepare_studies(datalist, work, patients)
    head = add_head_study(work)
    key = Bundle(app / "model" / BUNDLE_NAME).plausibility_key()
    figures: dict = {"patients": len(ids)}
    start = time.perf_counter()
    with LabelServer(venv, app, work / "studies", port, work / "monailabel.log") as server:
        info = server.wait_ready()
        figures["start_seconds"] = time.perf_counter() - start
        labels = model_labels(info, BUNDLE_NAME)
        if "liver" not in labels:
            raise LabelServerError(f"/info/ lists the labels {labels} for {BUNDLE_NAME}, not 'liver'")
        progress(f"MONAI Label up in {figures['start_seconds']:.0f} s; {BUNDLE_NAME} labels {labels}")
        dices, flags = [], []
        for image_id in ids:
            t0 = time.perf_counter()
            pred_path = work / f"pred_{image_id}.nii.gz"
            label, params = server.infer(BUNDLE_NAME, image_id)
            pred_path.write_bytes(label)
            dices.append(score_prediction(pred_path, work / "studies" / f"{image_id}.nii.gz",
                                          work / "studies" / "labels" / "final" / f"{image_id}.nii.gz"))
            flags.append(plausibility_flags(params, key, image_id))
            progress(f"/infer/{BUNDLE_NAME}?image={image_id}: Dice {dices[-1]:.4f} "
                     f"({time.perf_counter() - t0:.1f} s), shape and affine of the input; "
                     f"plausibility flags {flags[-1]}")
        figures["dice"] = dices
        figures["mean_dice"] = float(np.mean(dices))
        figures["plausibility_flags"] = flags
        _, params = server.infer(BUNDLE_NAME, head)
        figures["head_flags"] = plausibility_flags(params, key, head)
        progress(f"/infer/{BUNDLE_NAME}?image={head} (a head, the wrong input): "
                 f"plausibility flags {figures['head_flags']}")
        t0 = time.perf_counter()
        status = server.train(BUNDLE_NAME, {"max_epochs": train_epochs, "val_split": 0.0, "multi_gpu": False})
        figures["train_seconds"] = time.perf_counter() - t0
        figures["train_status"] = status.get("status")
        if status.get("status") != "DONE":
            raise LabelServerError(f"/train/{BUNDLE_NAME} ended with status {status.get('status')}: "
                                   f"{str(status.get('details', ''))[-500:]}")
        progress(f"/train/{BUNDLE_NAME}: {train_epochs} epoch(s), {figures['train_status']} "
                 f"in {figures['train_seconds']:.0f} s")
    return figures


def plausibility_flags(params: dict, key: str, image_id: str) -> list[str]:
    """The flags of the plausibility report in an infer response's params."""
    report = params.get(key)
    if not isinstance(report, dict) or "flags" not in report:
        raise LabelServerError(f"/infer of {image_id}: the response's params carry no '{key}' report "
                               f"(keys {sorted(params)}): did the bundle's postprocessing check run?")
    return report["flags"]


def score_prediction(pred_path: Path, image_path: Path, label_path: Path) -> float:
    """Dice of a returned label volume; it must have the input's shape and affine."""
    pred, image = nib.load(str(pred_path)), nib.load(str(image_path))
    if pred.shape[:3] != image.shape[:3]:
        raise LabelServerError(f"{pred_path.name}: shape {pred.shape} differs from the input's {image.shape}")
    if not np.allclose(pred.affine, image.affine, atol=1e-3):
        raise LabelServerError(f"{pred_path.name}: affine differs from the input's:\n{pred.affine}\n{image.affine}")
    truth = np.asarray(nib.load(str(label_path)).dataobj) > 0
    return dice(np.asarray(pred.dataobj).reshape(truth.shape) > 0, truth)
