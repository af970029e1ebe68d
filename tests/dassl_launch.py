"""Run a CoOp/ProGrad ``train.py`` inside real Dassl, in this (fresh) process.

Used by ``tests/test_dassl_integration.py`` as ``python dassl_launch.py TRAIN_PY ARGS...``
with ``PYTHONPATH`` holding the Dassl tree.  Before handing over to ``train.py`` (run as
``__main__``, exactly as ``python train.py ARGS...``) it registers the tiny open_clip
model configs found in ``$PROGRAD_FAST_TEST_MODELS`` (random weights: no hub offline).
The Dassl edits documented in docs/coop.md ("Dassl on current torch") are applied by the
test to the unpacked sources, not here: this file does nothing a user would not do.
"""

import os
import runpy
import sys


def main() -> None:
    train_py, args = sys.argv[1], sys.argv[2:]
    models = os.environ.get("PROGRAD_FAST_TEST_MODELS")
    if models:
        import open_clip

        open_clip.add_model_config(models)
    sys.path.insert(0, os.path.dirname(os.path.abspath(train_py)))
    sys.argv = [train_py, *args]
    runpy.run_path(train_py, run_name="__main__")


if __name__ == "__main__":
    main()
