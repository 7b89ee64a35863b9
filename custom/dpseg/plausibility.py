"""The bundle's plausibility check of a predicted liver, in dpseg's own inference (``dpseg evaluate``).

The check itself (measures in mL, mm and HU, the documented ranges, flags and notes, the MONAI
transform of the inference postprocessing) lives in the bundle, ``scripts/plausibility.py``, not in
this package: MONAI Label runs the bundle in its own environment, which has no dpseg (the Makefile
installs only MONAI Label's pins there and the server starts without ``PYTHONPATH``), so the bundle
may only reference code it carries. This module reaches that code through
:class:`dpseg.bundle.Bundle` and turns its reports into evaluate's records and warnings.
Ranges and flags: docs/plausibility.md.
"""

from __future__ import annotations

from types import ModuleType

from dpseg.bundle import Bundle


def checks(bundle: Bundle | None = None) -> ModuleType:
    """The bundle's ``scripts.plausibility`` module (``assess``, ``flags``, ``LIMITS``, ...)."""
    return (bundle or Bundle()).scripts_module("plausibility")


def case_record(report: dict) -> dict:
    """A report without its ``limits`` (one copy of them per evaluation is enough)."""
    return {k: v for k, v in report.items() if k != "limits"}


def flagged(cases: list[dict]) -> list[str]:
    """Patient ids of the cases whose prediction has a plausibility flag."""
    return [c["patient"] for c in cases if c["plausibility"]["flags"]]


def warning(patient: str, report: dict) -> str:
    """One line for the log or the terminal: the patient and its flags."""
    return f"warning: implausible liver segmentation of {patient}: " + "; ".join(report["flags"])
