"""The training worker of table 5: python -m binlat.bench --train-worker SPEC_JSON (prints one JSON line)."""

import json
import sys

from .training import train_worker

if len(sys.argv) == 3 and sys.argv[1] == "--train-worker":
    print(json.dumps(train_worker(json.loads(sys.argv[2]))))
else:
    sys.exit("usage: binlat bench [...] (this module's own entry point only runs training workers)")
