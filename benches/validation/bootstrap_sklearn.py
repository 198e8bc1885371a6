"""The bootstrap `nightingale validate` does, in Python with scikit-learn, for the ratio in
docs/performance.md: N predictions, B replicates of AUROC, average precision and Brier score
on rows resampled with replacement (numpy's generator), percentile intervals. Prints one
JSON line. Not a test.

    python benches/validation/bootstrap_sklearn.py predictions.csv 2000
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score


def main() -> None:
    path, replicates = sys.argv[1], int(sys.argv[2])
    data = np.loadtxt(path, delimiter=",", skiprows=1)
    y, p = data[:, 0].astype(int), data[:, 1]
    rng = np.random.default_rng(20261202)
    start = time.perf_counter()
    auc, ap, brier = [], [], []
    for _ in range(replicates):
        idx = rng.integers(0, len(y), len(y))
        yy, pp = y[idx], p[idx]
        if 0 < yy.sum() < len(yy):
            auc.append(roc_auc_score(yy, pp))
            ap.append(average_precision_score(yy, pp))
        brier.append(brier_score_loss(yy, pp))
    ci = np.percentile(auc, [2.5, 97.5])
    secs = time.perf_counter() - start
    print(json.dumps({"rows": len(y), "replicates": replicates, "seconds": round(secs, 3),
                      "auroc_ci": [float(ci[0]), float(ci[1])]}))


if __name__ == "__main__":
    main()
