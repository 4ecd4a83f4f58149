"""The decode queries a query-dependent policy scores with, saved by the attention forward for after it.

A query-dependent policy (attention_mass, head_split, row_anchored) rates a sequence's candidates under the query of
the step that requested the selection (step p; the trackers decide at the build of step p + 1). Scoring inside the
forward would keep attention out of CUDA graphs, since a replay runs no Python. Instead each layer's forward does one
thing a graph can replay: it gathers the query rows the builder named (`rows`, a persistent index) into a
persistent buffer of its own (`save`: one index_select into fixed addresses). The scoring runs from those buffers at
the start of the next step (worker/query_scoring.py), before that step's schedule can write any block (a
swap-in) and before its forward overwrites the buffers. The scores are the ones the forward would have computed:
the same query, and the same K/V (the candidates were complete before step p).

An engine whose default policy needs the query (`in_graphs`) copies on every step, needed or not (one small kernel
per layer), in graphs and out of them alike, so an eager engine (CPU, the tests) runs what a replay does. Any other
engine copies only on steps that ask (`live`), in forwards that run eagerly, and refuses query-dependent requests
where its attention runs in graphs (request_validation.py). A forward that did not run this layer's Python (a replay
without the copy) leaves `saved_step` behind, and the scoring fails those requests instead of reading stale
queries.
"""

from __future__ import annotations

import numpy as np
import torch


class SavedQueries:
    def __init__(self, num_layers: int, max_rows: int, in_graphs: bool):
        self.num_layers = num_layers
        self.max_rows = max_rows            # rows asked in one step: at most the decode rows, max_num_seqs
        self.in_graphs = in_graphs          # the engine's default policy needs the query: the copy is captured
        self.rows: torch.Tensor | None = None                 # [max_rows] int64 query row of each saved row (0: none)
        self.stacked: torch.Tensor | None = None              # [layers, max_rows, heads, head_size]
        self.step = 0                       # the plan being built (bumped by `begin_step`)
        self.saved_step = [-1] * num_layers  # the plan whose queries each layer's buffer holds, as far as Python saw
        self._asked: list[np.ndarray] = []
        self._dirty = False                 # `rows` holds indices of an earlier step

    @property
    def live(self) -> bool:
        return bool(self._asked)

    def begin_step(self) -> None:
        self.step += 1
        self._asked = []

    def ask(self, query_rows: np.ndarray, device) -> torch.Tensor:
        """The forward's query rows of some sequences -> their rows in the saved buffers ([R] int64 on device)."""
        start = sum(len(a) for a in self._asked)
        if start + len(query_rows) > self.max_rows:
            raise RuntimeError(f"{start + len(query_rows)} query rows asked in one step; at most {self.max_rows}")
        self._asked.append(np.asarray(query_rows, dtype=np.int64))
        return torch.arange(start, start + len(query_rows), dtype=torch.int64, device=device)

    def commit(self, device) -> None:
        """Write this step's row index before its forward (stream order); rows not asked read query row 0."""
        if not (self._asked or self._dirty):
            return
        if self.rows is None:
            self.rows = torch.zeros(self.max_rows, dtype=torch.int64, device=device)
        index = np.zeros(self.max_rows, dtype=np.int64)
        if self._asked:
            asked = np.concatenate(self._asked)
            index[: len(asked)] = asked
        self.rows.copy_(torch.from_numpy(index), non_blocking=True)   # pageable source: copied before returning
        self._dirty = bool(self._asked)

    def save(self, layer: int, query: torch.Tensor, planned: bool = True) -> None:
        """Inside layer `layer`'s attention forward: copy the asked rows of `query` [tokens, heads, head_size].
        planned: the forward has attention metadata (False in vLLM's profiling run, which only allocates)."""
        if not (self.in_graphs or self.live):
            return
        if self.stacked is None:   # in_graphs: by the profiling run, before any capture (fixed addresses)
            self.stacked = query.new_zeros((self.num_layers, self.max_rows) + tuple(query.shape[1:]))
            if self.rows is None:
                self.rows = torch.zeros(self.max_rows, dtype=torch.int64, device=query.device)
        if planned:   # in_graphs: every step, as a replay does (rows not asked read query row 0)
            torch.index_select(query, 0, self.rows, out=self.stacked[layer])
            self.saved_step[layer] = self.step

    def saved(self, step: int) -> bool:
        """Whether every layer's buffer holds the queries of plan `step` (always, for a captured copy)."""
        return self.in_graphs or all(s == step for s in self.saved_step)
