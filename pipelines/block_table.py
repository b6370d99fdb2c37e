"""The rank's block tables on the device, kept across steps: one row per running sequence.

A decode step then sends the device three numbers per sequence (token, position, row) instead
of its whole page list: pages are written to the table once, when they are allocated (one page
in 64 tokens), so the per-step host work does not grow with the context (SGLang keeps its
req_to_token pool for the same reason). Row `scratch_row` points every column at the cache's
scratch page: padding rows of a CUDA-graph bucket use it.
Never: decides pages (pipelines/batcher.py does) or runs the model.
"""
from __future__ import annotations

import torch

from epserve.pipelines.sequence import Sequence


class BlockTable:
    def __init__(self, n_rows: int, width: int, scratch_page: int, device):
        self.tables = torch.full((n_rows + 1, width), scratch_page, dtype=torch.int32, device=device)
        self.scratch_row, self.width = n_rows, width
        self._free = list(range(n_rows - 1, -1, -1))
        self._rows: dict[int, tuple[Sequence, int, int]] = {}     # id(seq) -> (seq, row, pages written)

    @property
    def n_free(self) -> int:
        return len(self._free)

    def rows_for(self, seqs: list[Sequence]) -> list[int]:
        """Table rows of `seqs` (this step's decode batch), writing the pages added since the last
        step in one device write. Rows of sequences no longer in the batch are freed first."""
        live = {id(s) for s in seqs}
        for key in [k for k in self._rows if k not in live]:
            self._free.append(self._rows.pop(key)[1])
        rows, rr, cc, pp = [], [], [], []
        for s in seqs:
            seq, row, done = self._rows.get(id(s), (s, -1, 0))
            if row < 0:
                if not self._free:
                    raise RuntimeError(f"block table full: {len(self._rows)} rows in use")
                row, done = self._free.pop(), 0
            n = len(s.pages)
            if n > self.width:
                raise RuntimeError(f"{s.request_id} holds {n} pages; the block table is {self.width} wide")
            if n > done:
                rr += [row] * (n - done)
                cc += range(done, n)
                pp += s.pages[done:n]
            self._rows[id(s)] = (s, row, n)
            rows.append(row)
        if rr:
            dev = self.tables.device
            idx = torch.tensor([rr, cc], dtype=torch.long).to(dev, non_blocking=True)
            self.tables[idx[0], idx[1]] = torch.tensor(pp, dtype=torch.int32).to(dev, non_blocking=True)
        return rows

    def truncate(self, seq: Sequence, n_pages: int) -> None:
        """The sequence gave pages back (pipelines/batcher.py trim): its next pages are written anew."""
        entry = self._rows.get(id(seq))
        if entry is not None and entry[2] > n_pages:
            self._rows[id(seq)] = (entry[0], entry[1], n_pages)

    def clear(self) -> None:
        self._free += [row for _, row, _ in self._rows.values()]
        self._rows.clear()
