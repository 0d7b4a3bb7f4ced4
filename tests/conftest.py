"""Suite-wide settings, applied before any test module imports torch.

why OMP_WAIT_POLICY=PASSIVE: several tests run real worker processes beside the test process on
a 2-core machine; OpenMP's default busy-waiting threads then steal each other's cores and make
every forward several times slower. Passive waiting changes speed only, never results.
HF_HUB_OFFLINE=1: nothing in the suite may reach a model hub.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
