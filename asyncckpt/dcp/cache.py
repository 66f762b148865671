"""nvidia-resiliency-ext's checkpoint metadata cache (``enable_cache=True`` in the async plan).

NVRx skips DCP's plan exchange when a save has the same structure as the one before. asyncckpt
keeps the cache object, its attributes and methods (so code that creates, passes or inspects it
works unchanged) and records every save's plans in it, but always plans in full: the exchange is
one gather/scatter of small plans, and a plan reused across a structure change would be a
silently wrong checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["CheckpointMetadataCache", "get_metadata_caching_status", "global_metadata_cache",
           "init_checkpoint_metadata_cache"]


def _structure(plan: Any) -> Any:
    """A plan without its per-save storage data (file prefix and save id), for comparison."""
    if plan is None:
        return None
    try:
        return dataclasses.replace(plan, storage_data=None)
    except TypeError:
        return plan


class CheckpointMetadataCache:
    """The plans and metadata of the previous save (NVRx's ``CheckpointMetadataCache``).

    ``validated_cache_reuse`` tells whether the last save had the same global plan as the one
    before it; ``validated_loaded_metadata_reuse`` is always False here (the metadata is always
    computed afresh).
    """

    def __init__(self) -> None:
        self.cached_central_plan: Any = None
        self.cached_local_plan: Any = None
        self.cached_global_metadata: Any = None
        self.validated_cache_reuse: bool = False
        self.validated_loaded_metadata_reuse: bool = False
        self.loaded_all_plans: list[Any] | None = None

    def set_cached_global_metadata(self, cached_global_metadata: Any) -> None:
        """Remember the metadata of a loaded checkpoint (and its ``all_local_plans`` when present)."""
        self.cached_global_metadata = cached_global_metadata
        self.loaded_all_plans = getattr(cached_global_metadata, "all_local_plans", None)

    def set_cache_metadata(self, central_plan: Any, local_plan: Any, global_md_verify_reuse: bool) -> None:
        """Record this save's plans; ``validated_cache_reuse`` becomes "same structure as before"."""
        self.validated_loaded_metadata_reuse = False
        self.validated_cache_reuse = (self.cached_central_plan is not None
                                      and _structure(central_plan) == _structure(self.cached_central_plan))
        self.cached_central_plan = central_plan
        self.cached_local_plan = local_plan

    def prepare_save_state_dict_ret(self, rank: int, coordinator: int, save_state_dict_ret: Any) -> Any:
        """NVRx's hook on the plan's return value: here it only caches the coordinator's metadata."""
        if save_state_dict_ret[1] is not None:
            self.cached_global_metadata = save_state_dict_ret[1]
        return save_state_dict_ret

    def get_cache_metadata(self) -> tuple[Any, Any, bool, list[Any] | None]:
        return (self.cached_central_plan, self.cached_local_plan, self.validated_cache_reuse, self.loaded_all_plans)

    def get_metadata_caching_status(self) -> tuple[bool, bool]:
        return self.validated_cache_reuse, self.validated_loaded_metadata_reuse


_CACHE: CheckpointMetadataCache | None = None


def init_checkpoint_metadata_cache(cached_global_metadata: Any = None) -> None:
    """Create the process-wide cache (once) and give it a loaded checkpoint's metadata."""
    global _CACHE
    if _CACHE is None:
        _CACHE = CheckpointMetadataCache()
    _CACHE.set_cached_global_metadata(cached_global_metadata)


def global_metadata_cache() -> CheckpointMetadataCache | None:
    """The process-wide cache made by :func:`init_checkpoint_metadata_cache` (None before)."""
    return _CACHE


def get_metadata_caching_status() -> tuple[bool, bool] | None:
    """``(validated_cache_reuse, validated_loaded_metadata_reuse)`` of the process-wide cache."""
    return None if _CACHE is None else _CACHE.get_metadata_caching_status()
