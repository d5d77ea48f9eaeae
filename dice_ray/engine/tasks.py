"""What Ray task fan-outs (DICE-GT replays, retraining runs) share: which failures resubmit a task."""

from __future__ import annotations

import ray

# A task lost with its worker or machine is resubmitted this many times (and reported); errors raised by
# the measurement itself are not retried.
TASK_RETRIES = 3
TASK_FAILURES = (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
                 ray.exceptions.OwnerDiedError)
