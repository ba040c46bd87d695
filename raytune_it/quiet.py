"""Library noise kept off the console, in one place for every process that loads models.

Each of these repeats once per process (a Ray Train worker, a Serve replica, an eval or generate engine)
and says nothing a user can act on: bitsandbytes' notice that an optional kernels package is missing, the
FutureWarnings that peft's and DDP's calls of transformers' renamed checkpointing methods raise, and
transformers' weight-loading bars. Warnings and errors of raytune-it's own, and every other library's, still
come through; Ray keeps each worker's full log in its session folder.
"""

from __future__ import annotations

import logging
import warnings


def quiet_library_noise() -> None:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`(gradient_checkpointing_enable|is_gradient_checkpointing)` is deprecated")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
