"""A rank's expert-placement versions: the one its engine routes with, one being staged in the
background, and the newest its unit asked it to switch to.

The lifecycle of a version v (actors/eplb_controller.py drives it; pipelines/expert_migration.py
does the weight work):
  stage(engine, phy2log, v)   the new slots' weights load on a background thread, off the step path;
  ask(v)                      the unit wants v (it arrives through the rank's inbox);
  ready_version()             v once staged without error and asked for, else the version in use:
                              the rank votes it, and the unit switches at the first step every
                              rank votes v (pipelines/lockstep.py);
  switch(engine, v, step)     before that step, on every rank: the staged weights go into their
                              slots and the dispatcher's map is swapped.
Owns the versions and the staging thread; never decides when to switch.
"""
from __future__ import annotations

import concurrent.futures

import torch

from epserve.pipelines.expert_migration import stage, switch


class PlacementVersions:
    def __init__(self, gpus_per_node: int):
        self.gpus_per_node = gpus_per_node
        self.version = 0                           # the map the engine routes with now
        self.switched_at: dict[int, int] = {}      # version -> the rank's step count when it switched
        self.wanted = 0                            # the newest version the unit asked for
        self._staging: concurrent.futures.Future | None = None
        self._staging_version = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stage")

    def stage(self, engine, phy2log: torch.Tensor, version: int) -> None:
        """Start loading this rank's weights for `phy2log` [n_moe, n_slots] in the background."""
        self._staging = self._pool.submit(stage, engine, phy2log)
        self._staging_version = version

    def staged(self) -> dict | None:
        """None while staging runs (or none was started); then what was staged (raises if it failed)."""
        if self._staging is None or not self._staging.done():
            return None
        st = self._staging.result()
        return {"version": self._staging_version, "loaded": st.n_loaded, "reused": st.n_reused}

    def ask(self, version: int) -> None:
        self.wanted = max(self.wanted, version)

    def ready_version(self) -> int:
        """The version this rank can switch to now: staged, without error, and asked for."""
        st = self._staging
        if st is not None and self.wanted > self.version and st.done() and st.exception() is None \
                and self._staging_version == self.wanted:
            return self.wanted
        return self.version

    def switch(self, engine, version: int, at_step: int) -> None:
        """Put the staged weights in place and route with `version` from step `at_step` on
        (the caller holds the engine's lock; raises if staging failed)."""
        switch(engine, self._staging.result(), self.gpus_per_node)
        self.version, self._staging = version, None
        self.switched_at[version] = at_step
