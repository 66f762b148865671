"""``nvidia_resiliency_ext.checkpointing.async_ckpt.state_dict_saver`` on asyncckpt's DCP path.

``save_state_dict_async_plan`` returns NVRx's ``(storage_writer, global_metadata,
dist_wrapper)`` (an :class:`~asyncckpt.dcp.AsyncSavePlan`, usable either way) and
``save_state_dict_async_finalize(*ret)`` commits on the coordinator, then tells every rank the
outcome with one int all-reduce: a failure raises ``CheckpointException`` on every rank. The
metadata cache (``enable_cache``, ``CheckpointMetadataCache``, ``init_checkpoint_metadata_cache``)
records the plans; planning always runs in full (see :mod:`asyncckpt.dcp.cache`).
"""

from __future__ import annotations

from typing import Any

from ..dcp.cache import CheckpointMetadataCache, get_metadata_caching_status, init_checkpoint_metadata_cache
from ..dcp.saver import save_state_dict_async_finalize, save_state_dict_async_plan

__all__ = [
    "CheckpointMetadataCache",
    "get_metadata_caching_status",
    "init_checkpoint_metadata_cache",
    "save_state_dict_async_finalize",
    "save_state_dict_async_plan",
    "verify_global_md_reuse",
]


def verify_global_md_reuse(loaded_all_plans: list[Any] | None, local_plan: Any, rank: int, dist_wrapper: Any) -> bool:
    """NVRx's check whether a loaded checkpoint's metadata could be reused: always False here
    (asyncckpt computes the metadata of every save afresh)."""
    return False
