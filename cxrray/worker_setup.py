"""`worker_process_setup_hook` of the local Ray that `cxrray.runtime.ensure_ray` starts. Imports only logging:
every worker process of that Ray runs it at start-up.

Ray Train's detached PlacementGroupCleaner asks the State API, which lives in the dashboard, whether the
controller is alive; a local Ray has no dashboard, so it warned every few seconds for a whole run (~16 lines
a minute). It cannot work there, and ray.shutdown removes the local cluster's placement groups anyway."""
from __future__ import annotations

import logging

CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_local_workers() -> None:
    """Silence the cleaner's State-API warning (the logger to ERROR); nothing else."""
    logging.getLogger(CLEANER_LOGGER).setLevel(logging.ERROR)
