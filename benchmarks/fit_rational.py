"""Fit the GeLU initialisations of PEDRO's rational activation, (5, 4) and the paper's (6, 5), and record their errors.

Runs `xpeft.pedro.rational_fit.fit_gelu_rational` (float64, linearised least squares then L-BFGS on 8001 points of
[-8, 8]) and writes the coefficients and their max errors against the exact GeLU on [-3, 3] and [-8, 8] to
`results/rational_fit.json`, next to the errors of the constants committed in `xpeft.pedro.generator`. The committed
constants are this script's output, copied by hand.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/fit_rational.py
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from xpeft.pedro.generator import GELU_RATIONAL_INIT
from xpeft.pedro.rational_fit import fit_gelu_rational, max_gelu_error

RESULTS = Path(__file__).resolve().parent / "results" / "rational_fit.json"
# The (5, 4) initialisation xpeft used before this script (an earlier fit on the mean squared error, whose L-BFGS
# stopped early); recorded for comparison. Adapters saved with it keep their own trained coefficients.
PREVIOUS_5_4 = (
    (0.0054859826, 0.49999626, 0.40565782, 0.11853811, 0.014811942, 0.00067074730),
    (-0.000094716641, 0.23704453, 0.000021004393, 0.0013394460),
)


def errors(numerator, denominator) -> dict:
    return {f"max_error_{w}": max_gelu_error(numerator, denominator, float(w)) for w in (3, 8)}


def main() -> None:
    torch.set_num_threads(1)
    report = {
        "command": "OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/fit_rational.py",
        "machine": platform.platform(),
        "torch": torch.__version__,
        "grid": "8001 equally spaced points of [-8, 8], float64; errors on 8001 points of [-w, w]",
        "fits": {},
    }
    for degrees in ((5, 4), (6, 5)):
        start = time.perf_counter()
        numerator, denominator = fit_gelu_rational(degrees)
        seconds = time.perf_counter() - start
        committed = GELU_RATIONAL_INIT.get(degrees)
        report["fits"][f"{degrees[0]},{degrees[1]}"] = {
            "numerator": numerator,
            "denominator": denominator,
            "fit_seconds": seconds,
            **errors(numerator, denominator),
            "committed": None
            if committed is None
            else {"numerator": committed[0], "denominator": committed[1], **errors(*committed)},
        }
        print(degrees, f"{seconds:.1f} s", errors(numerator, denominator))
        print("  numerator =", repr(numerator))
        print("  denominator =", repr(denominator))
    report["previous_5_4"] = {"numerator": PREVIOUS_5_4[0], "denominator": PREVIOUS_5_4[1], **errors(*PREVIOUS_5_4)}
    print("previous (5, 4)", report["previous_5_4"])
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", RESULTS)


if __name__ == "__main__":
    main()
