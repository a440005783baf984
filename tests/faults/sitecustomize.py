"""Fault injection for the multi-process tests: put this folder on PYTHONPATH and the worker whose RANK is
TRINITY_TEST_FAIL_RANK fails in its second optimizer step: it raises (TRINITY_TEST_FAIL_HOW=raise) or hangs as a
stuck native call would, deaf to SIGTERM (=hang). Python imports `sitecustomize` at start-up in every process."""
import os

if os.environ.get("RANK") is not None and os.environ.get("RANK") == os.environ.get("TRINITY_TEST_FAIL_RANK"):
    import signal
    import time

    from trinity_dpo.run import train

    _real_step, _calls = train.train_step, []

    def _failing_step(*args, **kwargs):
        _calls.append(1)
        if len(_calls) == 2:
            if os.environ.get("TRINITY_TEST_FAIL_HOW") == "hang":
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                time.sleep(3600)
            raise RuntimeError(f"simulated failure in rank {os.environ['RANK']}")
        return _real_step(*args, **kwargs)

    train.train_step = _failing_step
