from __future__ import annotations

import os
import sys

# Tests import their helpers as a plain module.
sys.path.insert(0, os.path.dirname(__file__))

# The run history goes to a file of the test session's own, never the user's (a test that
# needs one of its own sets MPMSUB_HISTORY or history=).
if "MPMSUB_HISTORY" not in os.environ:
    import tempfile

    os.environ["MPMSUB_HISTORY"] = os.path.join(tempfile.mkdtemp(prefix="mpmsub-history-"), "history.db")
