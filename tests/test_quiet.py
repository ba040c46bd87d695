"""The libraries' once-per-process notices stay off the console of every process that loads models (Ray
Train workers, Serve replicas, eval's driver, generate's actors), and nothing else is silenced."""

import subprocess
import sys

SCRIPT = r'''
import logging, warnings
from raytune_it.quiet import quiet_library_noise
quiet_library_noise()
from transformers.utils import logging as transformers_logging
assert not transformers_logging.is_progress_bar_enabled(), "weight-loading bars"
assert not logging.getLogger("bitsandbytes.backends.cpu.ops").isEnabledFor(logging.WARNING), "bitsandbytes notice"
assert logging.getLogger("raytune_it").isEnabledFor(logging.WARNING), "our own warnings"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("default")
    quiet_library_noise()
    warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
    warnings.warn("`something_else` is deprecated", FutureWarning)
assert [str(w.message) for w in caught] == ["`something_else` is deprecated"], caught
'''


def test_library_noise_is_quiet_and_nothing_else():
    subprocess.run([sys.executable, "-c", SCRIPT], check=True, timeout=120)
