"""Experiment tooling, not installed into a hospital's runtime path: the privacy-utility study and
its page (``study``, ``studyreport``), the benchmarks (``bench``), the canary audit of the DP step
(``privacyaudit``), the MONAI Label check (``labelserver``) and simulator runs (``simulation``).
Nothing outside ``dpseg.tools`` and the CLI imports it."""
