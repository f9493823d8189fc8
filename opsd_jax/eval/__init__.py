"""Evaluation: suites, grader, avg@k / pass@k, budget sweeps, resumable generation, reports."""
