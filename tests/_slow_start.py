"""A worker plug-in that starts slowly: imported by the worker at its start (``preload``), it sleeps,
then writes the file named by ``ASYNCCKPT_TEST_STARTED`` (tests/test_warm_up.py)."""

import os
import time

time.sleep(0.5)
with open(os.environ["ASYNCCKPT_TEST_STARTED"], "w") as f:
    f.write(str(os.getpid()))
