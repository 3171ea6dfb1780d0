"""`<run>/bad_samples.jsonl`: the samples the training stream skipped, and the limit on how many may fail.

One JSON object per line: `{"iteration", "rank", "index", "position", "file", "error"}`. The distinct failed
dataset indices over all ranks are counted; more than `train.max_bad_sample_fraction` of the dataset stops the run
(for datasets with one file per sample this is the fraction of files). On resume the entries of iterations that
are replayed are dropped, so the count and the file are the same as in an uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Set

from dinov2 import distributed

logger = logging.getLogger("dinov2")
BAD_SAMPLES_FILE = "bad_samples.jsonl"


class TooManyBadSamplesError(RuntimeError):
    """More than the allowed fraction of distinct samples could not be read."""


class BadSampleLog:
    """Collects per-iteration failure records from every rank (collective: call `update` on all ranks)."""

    def __init__(self, output_dir: str, dataset_len: int, max_fraction: float, start_iter: int = 0):
        if not 0.0 <= float(max_fraction) <= 1.0:
            raise ValueError(f"train.max_bad_sample_fraction must be in [0, 1], got {max_fraction}")
        self.path = os.path.join(output_dir, BAD_SAMPLES_FILE)
        self.dataset_len, self.max_fraction = int(dataset_len), float(max_fraction)
        self.bad: Set[int] = set()
        kept = self._read_before(start_iter)
        self.bad.update(int(e["index"]) for e in kept)
        distributed.barrier()  # every rank has read the file before the main rank rewrites it
        if distributed.is_main_process() and os.path.exists(self.path):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as fh:
                fh.writelines(json.dumps(e) + "\n" for e in kept)
            os.replace(tmp, self.path)

    def _read_before(self, start_iter: int) -> List[Dict[str, Any]]:
        if not os.path.exists(self.path):
            return []
        kept = []
        with open(self.path) as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    it = int(entry["iteration"])
                except (ValueError, KeyError, TypeError):  # a line cut by a kill: the rest is still usable
                    logger.warning("%s line %d is not a bad-sample record; ignored", self.path, n)
                    continue
                if it < start_iter:
                    kept.append(entry)
        return kept

    @property
    def limit(self) -> int:
        """Largest number of distinct bad samples that does not stop the run."""
        return int(self.max_fraction * self.dataset_len)

    def update(self, iteration: int, failures: List[Dict[str, Any]]) -> None:
        """Record this rank's `failures` of `iteration` (all ranks gather them) and stop past the limit."""
        # one small collective per iteration; the records are only gathered when some rank has failures
        if distributed.all_reduce_sum(len(failures)) == 0:
            return
        per_rank = distributed.all_gather_object(list(failures))
        entries = [dict(f, iteration=int(iteration), rank=r) for r, fs in enumerate(per_rank) for f in fs]
        for e in entries:
            self.bad.add(int(e["index"]))
            logger.warning("skipped unreadable sample %s (file %s) at iteration %d on rank %d: %s", e["index"],
                           e["file"], iteration, e["rank"], e["error"])
        if distributed.is_main_process():
            with open(self.path, "a") as fh:
                fh.writelines(json.dumps(e) + "\n" for e in entries)
        if len(self.bad) > self.limit:
            raise TooManyBadSamplesError(
                f"{len(self.bad)} of {self.dataset_len} distinct samples could not be read "
                f"({len(self.bad) / self.dataset_len:.1%}), more than train.max_bad_sample_fraction="
                f"{self.max_fraction}; training stopped at iteration {iteration}. The failures are listed in "
                f"{self.path}")
