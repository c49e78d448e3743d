"""``moshi`` is the bottom layer: importing it loads neither ``finetune`` nor the top-level ``modules``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
import moshi
import moshi.models.dsaa
import moshi.models.dsaa_loading
import moshi.models.lm_gen
import moshi.models.loaders
import moshi.models.model_loading
import moshi.run_inference
import moshi.utils.cuda_graph
print(json.dumps(sorted(sys.modules)))
"""


def test_importing_moshi_loads_no_upper_layer():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True, timeout=300
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "moshi.models.dsaa_loading" in loaded  # the probe really imported the DSAA side
    upper = [m for m in loaded if m == "modules" or m == "finetune" or m.startswith(("finetune.", "modules."))]
    assert upper == []
