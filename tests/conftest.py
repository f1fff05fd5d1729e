"""Test-session settings.

Command-line entry points ask for one CPU device per core (`meta_train.devices`); a test
that calls one in-process before anything else ran JAX would switch the whole session to
several devices. One device for every in-process test keeps results independent of test
order; tests/test_devices.py runs the multi-device path in a subprocess.
"""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "1")
