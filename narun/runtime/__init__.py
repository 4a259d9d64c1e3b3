"""The distributed runtime: actors, mailboxes, parameter-server buckets and the coordinator.

One process runs one actor on one asyncio (uvloop) loop; the coordinator starts
parameter-server shards and trainers as `python -m workers ROLE` processes on this host and
follows the job (README.md, "How it fits together" and "What happens when a process dies"):

    >>> from narun.config import load_config                                 # doctest: +SKIP
    >>> cfg = load_config("configs/mlp.yaml", ["runtime.mode=ps-sync", "runtime.workers=2"])
    >>> narun.runtime.train(cfg)["val_loss"]                                  # doctest: +SKIP
"""

from narun.errors import Refused
from narun.runtime.actor import Actor, run_actor
from narun.runtime.buckets import (
    BUCKET_BYTES,
    Bucket,
    Piece,
    Plan,
    join,
    make_plan,
    plan_for,
    split,
)
from narun.runtime.coordinator import Coordinator, check_config, train
from narun.runtime.mailbox import Mailbox, ReplyError, new_id
from narun.runtime.sdnotify import Notifier

__all__ = [
    "BUCKET_BYTES", "Actor", "Bucket", "Coordinator", "Mailbox", "Notifier", "Piece", "Plan",
    "ReplyError", "Refused", "check_config", "join", "make_plan", "new_id", "plan_for",
    "run_actor", "split", "train",
]
