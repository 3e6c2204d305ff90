"""Put on PYTHONPATH by hostile.numprune(signal_at=...): the process sends itself a signal at a point the test
chose, so a test of Ctrl-C or SIGTERM depends on no clock and no load.

NUMPRUNE_TEST_SIGNAL is ``SIGNAME module`` (the signal as ``module`` starts being imported) or
``SIGNAME module attribute.path`` (as that function of the module is first called, before its body runs).
Python runs a signal's handler at the next bytecode boundary, so the signal lands exactly there.
"""

import importlib.util
import os
import signal
import sys


class SignalAt:
    def __init__(self, spec: str):
        name, self.module, *attribute = spec.split()
        self.signum = signal.Signals[name]
        self.attribute = attribute[0] if attribute else None

    def find_spec(self, name, path=None, target=None):
        if name != self.module:
            return None
        sys.meta_path.remove(self)
        if self.attribute is None:
            os.kill(os.getpid(), self.signum)
            return None
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            *path, last = self.attribute.split(".")
            owner = module
            for part in path:
                owner = getattr(owner, part)
            original = getattr(owner, last)

            def signalled(*args, **kwargs):
                os.kill(os.getpid(), self.signum)
                return original(*args, **kwargs)

            setattr(owner, last, signalled)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("NUMPRUNE_TEST_SIGNAL"):
    sys.meta_path.insert(0, SignalAt(os.environ["NUMPRUNE_TEST_SIGNAL"]))
