"""User-facing commands (`panopticon <command>`, see `dinov2.run.cli`) and the submitit launchers for SLURM."""
