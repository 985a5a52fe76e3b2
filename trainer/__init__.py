"""hooktrain: one readable training loop, scale-out by configuration, optimization as callbacks."""

import time

# Taken before torch, Hydra and the rest are imported, so that `seconds_to_first_step` in
# summary.json counts the whole start-up a user waits through.
STARTED = time.time()

__version__ = "0.1.0"
