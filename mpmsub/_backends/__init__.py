"""Where jobs run: `base` (the `Backend` a name resolves to, and this machine's), `dask` and
`slurm` (their launchers, on the submitting side), `remote` (what crosses: packed specs, signed
results), and `node`, the side that runs where a job lands: the only backend module that
imports the engine.
"""
