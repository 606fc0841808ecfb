"""Training: the loop, its input pipeline, topology and multi-host agreement, logs and the dynamics monitor, the phases of a run and the dry run."""
