"""Logging set-up (`<out>/logs/log.txt`, `.rankN` for other ranks) and the training MetricLogger."""
from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
from collections import defaultdict, deque
from typing import Dict, Iterable, Iterator, Optional

import torch

from dinov2 import distributed

_FMT = "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"


def setup_logging(output: Optional[str] = None, *, name: str = "dinov2", level: int = logging.INFO,
                  capture_warnings: bool = True) -> logging.Logger:
    """Configure logger `name`: stdout on the main rank, and `<output>/logs/log.txt` (`.rank<N>` on other ranks)
    when `output` is a directory (a path ending in .txt/.log is used as the file itself)."""
    logging.captureWarnings(capture_warnings)
    logger = logging.getLogger(name)
    logger.setLevel(level)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    formatter = logging.Formatter(_FMT, datefmt="%Y%m%d %H:%M:%S")
    rank = distributed.get_rank()
    if rank == 0:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(formatter)
        logger.addHandler(sh)
    if output:
        if os.path.splitext(output)[-1] in (".txt", ".log"):
            filename = output
        else:
            filename = os.path.join(output, "logs", "log.txt")
        if rank > 0:
            filename = f"{filename}.rank{rank}"
        os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
        fh = logging.FileHandler(filename, mode="a")
        fh.setFormatter(formatter)
        logger.addHandler(fh)
    return logger


class SmoothedValue:
    """Track a series of values; report window median/average and the global average."""

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None):
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4g} ({global_avg:.4g})"

    def update(self, value: float, num: int = 1) -> None:
        self.deque.append(value)
        self.count += num
        self.total += value * num

    def synchronize_between_processes(self) -> None:
        """Sum `count`/`total` over ranks (the window stays local)."""
        if not distributed.is_enabled():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        self.count, self.total = int(t[0].item()), float(t[1].item())

    @property
    def median(self) -> float:
        return torch.tensor(list(self.deque)).median().item() if self.deque else float("nan")

    @property
    def avg(self) -> float:
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item() if self.deque else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else float("nan")

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else float("nan")

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """Collect meters; every `print_freq` iterations log a progress line with ETA and append a JSON line of
    the meters' medians to `output_file` (main rank only)."""

    def __init__(self, delimiter: str = "  ", output_file: Optional[str] = None,
                 logger: Optional[logging.Logger] = None):
        self.meters: Dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.output_file = output_file
        self.logger = logger or logging.getLogger("dinov2")
        self.last_record: Dict[str, float] = {}

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def update(self, **kwargs) -> None:
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            if not isinstance(v, (float, int)):
                raise TypeError(f"meter {k!r} got a {type(v).__name__}, expected a number")
            self.meters[k].update(v)

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def dump_in_output_file(self, iteration: int, iter_time: float, data_time: float, **extra) -> dict:
        record = dict(iteration=iteration, iter_time=iter_time, data_time=data_time, **extra)
        record.update({k: v.median for k, v in self.meters.items()})
        self.last_record = record
        if self.output_file is not None and distributed.is_main_process():
            with open(self.output_file, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "", n_iterations: Optional[int] = None,
                  start_iteration: int = 0, on_log=None) -> Iterator:
        """Yield from `iterable` from `start_iteration` to `n_iterations`, logging progress every `print_freq`
        iterations and at the last one. `on_log(record)` is called with each JSON record."""
        i = start_iteration
        if n_iterations is None:
            n_iterations = len(iterable)  # type: ignore[arg-type]
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        space = len(str(n_iterations))
        start = end = time.time()
        if i >= n_iterations:
            return
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if (i % print_freq == 0 or i == n_iterations - 1):
                eta_s = iter_time.global_avg * (n_iterations - i - 1)
                eta = str(datetime.timedelta(seconds=int(eta_s)))
                record = self.dump_in_output_file(i, iter_time.avg, data_time.avg)
                if on_log is not None:
                    on_log(record)
                mem = ""
                if torch.cuda.is_available():
                    mem = f"  max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
                self.logger.info(
                    f"{header} [{i:{space}d}/{n_iterations}]  eta: {eta}{self.delimiter}{self}"
                    f"{self.delimiter}time: {iter_time.avg:.4f}  data: {data_time.avg:.4f}{mem}"
                )
            i += 1
            end = time.time()
            if i >= n_iterations:
                break
        total = time.time() - start
        self.logger.info(f"{header} Total time: {datetime.timedelta(seconds=int(total))} "
                         f"({total / max(i - start_iteration, 1):.4f} s / it)")
