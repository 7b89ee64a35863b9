"""Federated CT liver segmentation with patient-level differential privacy."""
