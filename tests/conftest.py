from __future__ import annotations

import os
import sys

# Tests import their helpers as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
