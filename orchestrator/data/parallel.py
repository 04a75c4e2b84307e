"""Run preparation tasks on the cluster with Ray Data, and bring their reports back in order.

Each item (a chunk of text, a batch of images) becomes one task that writes its own shards and
returns a small report; the driver holds the reports only. A single item runs in this process:
data that fits one chunk is not worth starting Ray for.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from orchestrator.data.sources import DataError

__all__ = ["merged_splits", "run_tasks"]

Item = TypeVar("Item")
Report = dict[str, Any]


def run_tasks(
    task: Callable[[Item, Any], Report],
    items: Sequence[Item],
    job: Any,
    *,
    address: str | None,
    verbose: bool,
) -> list[Report]:
    """`task(item, job)` for every item, as Ray Data tasks spread over the cluster's nodes;
    the reports in the items' order."""
    if len(items) <= 1:
        return [task(item, job) for item in items]
    import ray.data

    from orchestrator.ray_session import ray_session

    with ray_session(address, verbose):
        # One row (and so one task) per item; the item travels pickled, since Arrow cannot
        # hold it, and the report comes back as JSON for the same reason.
        rows = [{"order": i, "item": pickle.dumps(item)} for i, item in enumerate(items)]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds = ds.map(_call, fn_kwargs={"task": task, "job": job})
        try:
            done = ds.take_all()
        except Exception as exc:
            raise _user_error(exc) from None
    return [json.loads(row["report"]) for row in sorted(done, key=lambda row: row["order"])]


def merged_splits(reports: list[Report], counts: tuple[str, ...] = ()) -> dict[str, Any]:
    """The manifest's splits from the tasks' reports, in their order: the rows and the shards of
    each split, and the sum of each of `counts` (such as "tokens")."""
    return {
        split: {
            "rows": sum(r[split]["rows"] for r in reports),
            "shards": [name for r in reports for name in r[split]["shards"]],
            **{key: sum(r[split][key] for r in reports) for key in counts},
        }
        for split in ("train", "eval")
    }


def _call(row: dict[str, Any], task: Callable[[Any, Any], Report], job: Any) -> dict[str, Any]:
    report = task(pickle.loads(row["item"]), job)
    return {"order": row["order"], "report": json.dumps(report)}


def _user_error(exc: BaseException) -> BaseException:
    """The DataError a task raised, out of Ray's wrappers; anything else as it came."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, DataError):
            # Ray's task error subclasses the original: keep the message, not its traceback.
            return DataError(str(error.args[0]) if error.args else str(error))
        todo += [error.__cause__, error.__context__, getattr(error, "cause", None)]
    return exc
