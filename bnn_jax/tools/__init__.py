"""Tools: the benchmarks (training step, inference, input pipeline, weight dynamics) and the analysis of finished runs."""
