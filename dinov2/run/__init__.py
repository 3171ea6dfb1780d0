"""submitit launchers for SLURM (and local / in-process debugging): `python dinov2/run/train.py ...`."""
