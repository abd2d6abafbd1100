import json, math
from pathlib import Path
from fedshield.privacy.audit import audit
from fedshield.privacy.ledger import Ledger, chain_epsilon
d = Path("tests/data/ledger-v1")
out = {}
for f in sorted(d.glob("*.jsonl")):
    entries = Ledger(f).read().entries
    r = audit(f, ledger_keys_dir=d / "keys")
    out[f.name] = {"ok": r.ok, "flags": r.flags,
        "chain_epsilon": [chain_epsilon(entries[: i + 1], 1e-5) for i in range(len(entries))],
        "sites": {s: {"recorded": a.recorded_epsilon, "rdp": None if math.isnan(a.rdp_epsilon) else a.rdp_epsilon,
                      "pld": None if math.isnan(a.pld_epsilon) else a.pld_epsilon} for s, a in r.sites.items()},
        "reference": [row["reference"] for row in r.entries]}
(d / "expected.json").write_text(json.dumps(out, indent=1) + "\n")
