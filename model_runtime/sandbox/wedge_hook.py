"""Test-only: one C call that neither a request's stop nor its async exception reaches.

Request code can import this module only on a replica whose environment sets
`NDIF_SANDBOX_TEST_WEDGE_HOOK=1` (`capabilities.WEDGE_HOOK_ENV`), which only the test fixture
does; the wedged-replica test uses it to prove that Serve replaces a replica stuck in such a call.
"""

from __future__ import annotations

import time

# time.sleep, taken before the sandbox proxies `time` (whose sleep waits on the stop instead).
_c_sleep = time.sleep


def block(seconds: float) -> None:
    """Sleep in one C call for `seconds`: no stop check, no bytecode boundary for an async exception."""
    _c_sleep(float(seconds))
