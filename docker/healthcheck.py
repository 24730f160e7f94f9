"""Container health check: exit 0 when the service's /readyz returns 200.

It runs inside the container, so it requests the loopback address on
NOPROP_PORT.
"""

import os
import sys
import urllib.error
import urllib.request

port = os.environ.get("NOPROP_PORT", "8000")
url = f"http://127.0.0.1:{port}/readyz"
try:
    with urllib.request.urlopen(url, timeout=2) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError) as error:
    print(f"{url}: {error}", file=sys.stderr)
    sys.exit(1)
