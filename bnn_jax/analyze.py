"""`python -m bnn_jax.analyze RUN [RUN ...]`: plots and a report of finished runs.

Also `from bnn_jax import analyze` in a notebook (`analyze.load_run`,
`analyze.plot_dynamics`, ...). The code: `bnn_jax.tools.analyze`.
"""

from bnn_jax.tools.analyze import (  # noqa: F401
    DYNAMICS_PANELS, DYNAMICS_PREFIX, LAYER_METRICS, REPORT_METRICS, Run,
    align_phases, analyze, load_run, main, plot_dynamics, plot_layers,
    plot_training, write_report)

if __name__ == "__main__":
  main()
