"""Learned memory (m="auto"): `keys` (which runs are of the same tool, and the input size),
`estimate` (the prediction, a pure function), `history` (the run history in SQLite, and its
writer thread), `runbook` (an executor's runs per key).
"""
