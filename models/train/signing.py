"""Re-sign a regenerated bundle with the repository's DEMONSTRATION key.

Every script that writes a `bundle.toml` calls `sign_bundle` afterwards, so the committed
reference bundles always carry a `bundle.toml.minisig` that verifies. The key in keys/demo/
is public knowledge (its secret half is committed on purpose): it proves the signing path works
end to end and must never sign a production bundle. Sign your own bundles with your own key:
`nightingale models sign --key /path/to/your.key <bundle>`.

Signing is done by the server's own CLI (`nightingale models sign`), which is deterministic
(plain Ed25519 over the manifest's BLAKE2b-512 prehash, fixed comments): regenerating an
unchanged manifest rewrites identical signature bytes. Set NIGHTINGALE_BIN to a built binary to
skip `cargo run`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_KEY = REPO / "keys" / "demo" / "nightingale-demo.key"


def sign_bundle(bundle_dir: Path) -> None:
    binary = os.environ.get("NIGHTINGALE_BIN")
    cmd = [binary] if binary else ["cargo", "run", "--quiet", "--release", "--"]
    cmd += ["models", "sign", "--key", str(DEMO_KEY), str(bundle_dir)]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=3600)
