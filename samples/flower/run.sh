#!/usr/bin/env bash
# A real Flower federation on localhost, recorded by gitool, then attacked and scored:
#
#   federation  one Flower server (FedAvg wrapped by gitool.integrations.flower.RecordingStrategy)
#               and 3 client processes, 2 rounds, gitool's LeNet (ReLU) on private partitions of
#               the bundled synthetic images; 32 samples per client, B = 8, 1 local epoch (m = 4)
#   labels      the server recovers each client's label counts from its update alone (RLU)
#   score       only now the clients' truth files: cAcc / iAcc per round and client
#
# Usage: samples/flower/run.sh OUT_DIR     (after `source .venv/bin/activate`; under a minute on 2 CPU cores)
# Every process listens or connects on 127.0.0.1 only and is stopped when the federation ends.
set -euo pipefail

out="${1:?usage: samples/flower/run.sh OUT_DIR}"
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python}"
gitool="${GITOOL:-gitool}"
if [ -e "$out/updates" ]; then
    echo "$out already holds a recording; give a new folder" >&2
    exit 2
fi

# 1. The federation (server + clients), recorded: $out/updates/round-RRR/client-I.update.safetensors
"$python" "$here/federation.py" "$out" --clients 3 --rounds 2 --timeout 180

# 2. The server's attack, from the recorded updates alone, and 3. the score against the truths.
for round in "$out"/updates/round-*; do
    name="$(basename "$round")"
    $gitool labels "$round" --method rlu --aux synthetic --out-dir "$out/labels/$name" --json > "$out/labels-$name.json"
    $gitool score "$out/labels/$name" --truth-dir "$out/truth/$name" --json > "$out/score-$name.json"
done

# 4. One table: what leaked, per round and client.
"$python" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'round':<10} {'client':<10} {'N':>4} {'cAcc':>6} {'iAcc':>6} {'LnAcc':>6}")
for path in sorted(out.glob("score-round-*.json")):
    for row in json.loads(path.read_text())["files"]:
        name = Path(row["file"]).name.split(".")[0]
        print(f"{path.stem[6:]:<10} {name:<10} {row['true_total']:4d} {row['cAcc']:6.3f} {row['iAcc']:6.3f} "
              f"{row['LnAcc']:6.3f}")
PY
