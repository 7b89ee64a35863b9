import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from conftest import BUNDLE_DIR
from dpseg.datalist import resolve
from dpseg.evaluate import Segmenter, evaluate
from dpseg.synthetic import write_cohort

MANDATORY_META = ["version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
                  "task", "description", "authors", "copyright", "network_data_format"]


def _configs(name):
    return json.loads((BUNDLE_DIR / "configs" / name).read_text())


def test_metadata_has_every_mandatory_key():
    meta = _configs("metadata.json")
    missing = [k for k in MANDATORY_META if k not in meta]
    assert not missing
    fmt = meta["network_data_format"]
    assert list(fmt["inputs"]) == ["image"] and list(fmt["outputs"]) == ["pred"]
    assert fmt["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "liver"}
    for f in ("configs/train.json", "configs/inference.json", "configs/evaluate.json", "configs/logging.conf",
              "docs/README.md", "LICENSE", "models/model.pt"):
        assert (BUNDLE_DIR / f).is_file(), f


def test_train_and_inference_share_one_network_and_preprocessing_settings():
    train, infer = _configs("train.json"), _configs("inference.json")
    for key in ("network_def", "roi_size", "pixdim", "hu_window"):
        assert train[key] == infer[key], key


def test_network_is_dp_ready(bundle):
    net = bundle.network()
    assert ModuleValidator.validate(net, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert not any(getattr(m, "inplace", False) for m in net.modules())
    gsm = GradSampleModule(net, loss_reduction="sum")
    x = torch.rand(3, 1, *bundle.roi_size())
    gsm(x).sum().backward()
    for p in net.parameters():
        assert p.grad_sample.shape[0] == 3
    # per-sample gradients add up to the batch gradient
    p = next(net.parameters())
    assert torch.allclose(p.grad_sample.sum(0), p.grad, rtol=1e-4, atol=1e-3)


def test_loss_is_a_mean_of_per_sample_losses(bundle):
    loss = bundle.loss()
    torch.manual_seed(0)
    logits = torch.randn(4, 2, 32, 32)
    labels = (torch.rand(4, 1, 32, 32) > 0.7).float()
    whole = loss(logits, labels)
    each = torch.stack([loss(logits[i:i + 1], labels[i:i + 1]) for i in range(4)])
    assert torch.allclose(whole, each.mean(), atol=1e-5)


def test_training_transforms_give_one_slice_per_patient(bundle, cohort):
    items = resolve(cohort / "site-1" / "datalist.json", "training")
    sample = bundle.train_transforms()(items[0])
    sample = sample[0] if isinstance(sample, list) else sample
    assert tuple(sample["image"].shape) == (1, *bundle.roi_size())
    assert tuple(sample["label"].shape) == (1, *bundle.roi_size())
    shift = bundle.intensity_shift()  # the bundle's random intensity shift, public to the auditor's attacker
    assert shift == 0.05
    assert -shift <= float(sample["image"].min()) and float(sample["image"].max()) <= 1 + shift  # window + shift
    assert set(torch.unique(sample["label"]).tolist()) <= {0.0, 1.0}


def test_one_training_iteration_changes_the_weights_and_lowers_the_loss(bundle, cohort):
    torch.manual_seed(0)
    net, loss_fn, tf = bundle.network(), bundle.loss(), bundle.train_transforms()
    items = resolve(cohort / "site-1" / "datalist.json", "training")
    batch = [tf(it) for it in items]
    batch = [b[0] if isinstance(b, list) else b for b in batch]
    x = torch.stack([b["image"] for b in batch])
    y = torch.stack([b["label"] for b in batch])
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    first = loss_fn(net(x), y)
    first.backward()
    opt.step()
    assert torch.isfinite(first)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    with torch.no_grad():
        assert loss_fn(net(x), y) < first


def test_inference_on_a_whole_volume_returns_the_input_geometry(bundle, cohort):
    net = bundle.load_weights(bundle.network())
    segment = Segmenter(bundle, net)
    for site in ("site-1", "site-2"):  # RAS and LPS storage, different spacings
        item = resolve(cohort / site / "datalist.json", "test")[0]
        pred = segment(item["image"])
        img = nib.load(item["image"])
        assert pred.shape == img.shape
        assert set(np.unique(pred)) <= {0, 1}


def test_bundle_inference_config_writes_a_label_volume_with_input_shape_and_affine(cohort, tmp_path):
    images = cohort / "site-2" / "imagesTr"
    out = tmp_path / "pred"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE_DIR / "configs/inference.json"),
           "--meta_file", str(BUNDLE_DIR / "configs/metadata.json"), "--bundle_root", str(BUNDLE_DIR),
           "--dataset_dir", str(images), "--output_dir", str(out),
           "--datalist", f"$['{sorted(images.glob('*.nii.gz'))[0]}']"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    source = nib.load(str(sorted(images.glob("*.nii.gz"))[0]))
    written = sorted(out.glob("*_seg.nii.gz"))
    assert len(written) == 1
    seg = nib.load(str(written[0]))
    assert seg.shape == source.shape
    assert np.allclose(seg.affine, source.affine, atol=1e-3)
    assert set(np.unique(np.asanyarray(seg.dataobj))) <= {0, 1}
    # the plausibility report beside it (NIfTI carries no such meta): a normal abdomen, no flag
    reports = sorted(out.glob("*_plausibility.json"))
    assert [r.name for r in reports] == [written[0].name.replace("_seg.nii.gz", "_plausibility.json")]
    report = json.loads(reports[0].read_text())
    assert report["plausible"] and report["flags"] == [] and report["measures"]["volume_ml"] > 0


def test_shipped_weights_have_plain_keys_and_segment_new_patients(bundle, tmp_path):
    state = torch.load(bundle.model_path(), weights_only=True)
    assert not any(k.startswith("_module.") for k in state)
    net = bundle.load_weights(bundle.network())  # strict: every key matches
    cohort = tmp_path / "unseen"
    datalists = write_cohort(cohort, n_sites=3, patients=[3, 3, 3], seed=12345)
    results = [evaluate(d, bundle, net, "training") for d in datalists]
    scores = [r["mean_dice"] for r in results]
    assert min(scores) > 0.8, scores
    # and none of these abdominal CTs gets a plausibility flag
    assert [r["flagged"] for r in results] == [[], [], []], [c["plausibility"] for r in results for c in r["cases"]]


def test_verify_net_in_out_and_torchscript_export(tmp_path):
    cfg, meta = str(BUNDLE_DIR / "configs/inference.json"), str(BUNDLE_DIR / "configs/metadata.json")
    verify = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_net_in_out", "--net_id", "network_def",
                             "--meta_file", meta, "--config_file", cfg], capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stderr[-3000:]
    assert "data shape of network is verified with no error" in (verify.stdout + verify.stderr)
    ts = tmp_path / "model.ts"
    export = subprocess.run([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
                             "--ckpt_file", str(BUNDLE_DIR / "models/model.pt"), "--meta_file", meta,
                             "--config_file", cfg], capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    scripted = torch.jit.load(str(ts))
    out = scripted(torch.rand(1, 1, 128, 128))
    assert tuple(out.shape) == (1, 2, 128, 128)
