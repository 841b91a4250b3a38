"""The README's demo command runs offline and reloads every adapter it trains (few steps, to stay fast)."""

import re
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def test_demo_runs_and_every_adapter_reloads():
    result = subprocess.run([sys.executable, str(DEMO), "--steps", "3"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if re.match(r"(ETHER|X-PEFT|PEDRO).* \d+\.\d$", line)]
    assert len(rows) == 6, result.stdout
    assert "reloads with PeftModel.from_pretrained" in result.stdout
