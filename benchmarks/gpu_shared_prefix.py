"""GPU check of the shared-prefix text encoder (issue 11's GPU targets), ready to run.

ViT-B-16 with random weights, bf16 autocast, on the first CUDA device:

1. the text encoder (forward + one backward with both ProGrad cotangents) at 100 and 1000
   ImageNet classes: today's truncated encoder against the shared-prefix encoder in each
   suffix layout (``benchmarks/text_encoder.py``; the features and gradients are checked
   against the truncated encoder first);
2. one training step end to end at 1000 classes, batch 32, 224 px: paper-style ProGrad,
   official-style CoOp (77-token prompts, one backward, torch SGD), prograd_fast ProGrad
   with and without the shared prefix, prograd_fast CoOp (``benchmarks/gpu_e2e.py``; the
   float64 same-update checks run first).

Targets (ratios within one run): text encoder >= 2.5x (100 classes) and >= 3x (1000
classes) faster than the truncated one; the prograd_fast ProGrad step a fraction of the
official CoOp step.  Run: ``python benchmarks/gpu_shared_prefix.py`` (exits 0 with a
message without CUDA).  Expect about a minute on an H200 (model set-up included);
``benchmarks/device_check.sh`` runs it with the other ``gpu_*.py`` scripts
(``DEVICE_CHECK_OTHER_S`` raises their 60 s limit).
"""

from __future__ import annotations

import sys

import torch

import gpu_e2e
import text_encoder


def main(argv=None) -> int:
    if not torch.cuda.is_available():
        print("gpu_shared_prefix: no CUDA device here; skipped")
        return 0
    rc = text_encoder.main(["--device", "cuda", "--autocast", "bf16", "--classes", "100", "1000",
                            "--iters", "10"])
    rc |= gpu_e2e.main(["--device", "cuda", "--classes", "1000", "--batch", "32", "--iters", "10"])
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
