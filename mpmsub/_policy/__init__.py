"""The rules, as pure code: no threads, no processes, no clock (time is passed in).

`ledger` (capacity and reservations), `scheduler` (the queue's order, the head's reservation,
backfill), `enforce` (which running job is stopped for memory, and the sentence), `runs` (what
follows a run's end, an OOM kill recognised, the live gate, m="auto"'s probe).
"""
