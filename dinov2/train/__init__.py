"""Self-supervised pretraining: `ssl_meta_arch` (student/teacher, losses, EMA), `train` (CLI and loop),
`checkpointer` (atomic checkpoints and exact resume), `reporting` (W&B, training curve, evaluation calls)."""
