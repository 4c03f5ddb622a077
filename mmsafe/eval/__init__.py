"""Evaluation: robustness suites, certification reports, plots."""
