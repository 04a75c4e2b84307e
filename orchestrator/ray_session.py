"""Connecting to Ray: an existing cluster when given an address, else a local instance."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ray_session"]


@contextmanager
def ray_session(address: str | None = None, verbose: bool = False) -> Iterator[None]:
    """Use the Ray that is already initialized, or start/connect one and shut it down after."""
    import ray
    import ray.data  # configures Ray Data's loggers, which we then quiet

    if not verbose:
        # orch prints its own progress; Ray Data's per-operator log lines drown it.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # Notices the user cannot act on: a local Ray's token auth being on (it is meant to
        # be), and Ray Train's own use of a Ray Data option Ray deprecated.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR
        )
        warnings.filterwarnings("ignore", message=".*exclude_resources.*")
    if ray.is_initialized():
        yield
        return
    ray.init(
        address=address,
        include_dashboard=False if address is None else None,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
    )
    try:
        yield
    finally:
        ray.shutdown()
