"""tests/e2e on the host: only the stage test is collected; tests/e2e/inguest/ runs inside the guest
(TESSERA_IN_GUEST=1, set by guest_inner.py), never on the host kernel, which lacks what those tests need."""
from __future__ import annotations

import os

collect_ignore = [] if os.environ.get("TESSERA_IN_GUEST") == "1" else ["inguest"]
if os.environ.get("TESSERA_IN_GUEST") == "1":
    collect_ignore.append("test_guest_stage.py")  # no guests inside guests
