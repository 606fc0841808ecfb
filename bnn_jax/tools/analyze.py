"""Plots and a markdown report of one or several training runs.

  python -m bnn_jax.analyze --workdir=DIR [--compare DIR2 ...] --out=OUT \
      [--labels A B ...] [--phases step1 step2] [--debug]

Reads each run's `metrics.jsonl` (and `results.json`) and writes to OUT:

  training.png          train loss, top-1 (eval solid, train faint) and
                        learning rate against the step
  dynamics.png          the `bnn_jax.dynamics` metrics (flip ratio, C2I, dead
                        and zero-gradient fractions, latent weights outside
                        the STE window, saturated binariser inputs,
                        constant binarised input channels, Adam's v for dead
                        and live weights)
  layers_<metric>.png   per-layer heatmaps (layer x step), one column per run
  report.md             a results table, every dynamics metric per phase
                        (its mean over the phase or its last value), and
                        links to the plots

Steps are counted across phases (phase k starts where phase k-1 ended;
dotted lines mark the boundaries). Runs given the same label (`--labels`)
are seeds of one setting: they are drawn as their mean with a min-max band,
and the report gives mean +- standard deviation over them.

Bad input (a directory without metrics.jsonl, labels that do not match the
runs) ends the command with a one-line error, exit status 1 (`--debug`
shows the traceback).

Figures are drawn with matplotlib's object-oriented API and saved through
its Agg canvas (no pyplot state), so importing this module in a notebook
leaves the notebook's plotting backend alone.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import warnings
from typing import Optional, Sequence

import matplotlib
from matplotlib import figure
import numpy as np

from bnn_jax import cli
from bnn_jax import paths

DYNAMICS_PREFIX = "dynamics/"
# Overall dynamics metrics, in the order they are plotted, with titles.
DYNAMICS_PANELS = (
    ("flip_ratio", "flip-flop ratio (consecutive steps)"),
    ("c2i", "C2I vs initialisation"),
    ("c2i_phase", "C2I vs phase start"),
    ("dead_fraction", "dead weights (|g| <= rho mean|g|)"),
    ("zero_grad_fraction", "weights with zero gradient"),
    ("outside_window", "latent weights with |w| > 1"),
    ("saturated_fraction", "saturated binariser inputs"),
    ("constant_channel_fraction", "constant binarised input channels"),
    ("adam_v", "Adam v: dead (dashed) vs live"),
)
LAYER_METRICS = ("flip_ratio", "c2i", "dead_fraction", "saturated_fraction",
                 "constant_channel_fraction")
# The report's dynamics table: (metric, 'mean' over the phase or its 'end').
REPORT_METRICS = (
    ("flip_ratio", "mean"), ("c2i", "end"), ("c2i_phase", "end"),
    ("dead_fraction", "mean"), ("zero_grad_fraction", "mean"),
    ("outside_window", "end"), ("saturated_fraction", "mean"),
    ("constant_channel_fraction", "mean"), ("adam_v_dead", "mean"),
    ("adam_v_live", "mean"))


@dataclasses.dataclass
class Run:
  """One run's metrics: per phase, per metric name, (steps, values).

  `starts` (phase -> global step of its first step) and `lengths` (phase ->
  steps) place the phases on one axis; `align_phases` sets them so that
  several runs share it.
  """
  workdir: str
  label: str
  phases: list[str]
  series: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
  results: dict
  starts: dict[str, int] = dataclasses.field(default_factory=dict)
  lengths: dict[str, int] = dataclasses.field(default_factory=dict)

  def length(self, phase: str) -> int:
    """Steps of a phase: results.json's count, else its last logged step."""
    steps = self.results.get(phase, {}).get("steps")
    if steps is None:
      steps = max((int(s[-1]) for s, _ in self.series[phase].values()),
                  default=0)
    return int(steps)


def align_phases(runs: Sequence[Run]) -> None:
  """Puts the runs' phases on one step axis.

  Phases are ordered by first appearance and each lasts as long as in its
  longest run, so e.g. step 2 starts at the same global step in a run that
  trained step 1 and in one that loaded it (0 steps).
  """
  order = list(dict.fromkeys(p for r in runs for p in r.phases))
  lengths = {p: max(r.length(p) for r in runs if p in r.phases)
             for p in order}
  starts, total = {}, 0
  for phase in order:
    starts[phase] = total
    total += lengths[phase]
  for run in runs:
    run.starts, run.lengths = starts, lengths


def _as_float(value) -> float:
  return float(value)  # "nan" / "inf" strings (logs.JsonlWriter) included


def load_run(workdir: str, label: Optional[str] = None,
             phases: Optional[Sequence[str]] = None) -> Run:
  """Reads `<workdir>/metrics.jsonl` (and results.json when present).

  Records of one (phase, step) are merged, the later value of a name
  winning (a resumed run logs some steps twice).

  Args:
    workdir: a run directory written by `bnn_jax.main`.
    label: the run's name in plots (default: the directory's name).
    phases: keep only those of these phases the run has (default: all, in
      training order).

  Raises:
    FileNotFoundError: no metrics.jsonl in workdir.
    ValueError: the run has none of `phases`.
  """
  run_dir = paths.resolve(workdir, "workdir")
  path = run_dir / "metrics.jsonl"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist; pass a --workdir written "
                            "by `python -m bnn_jax.main`")
  merged: dict[tuple[str, int], dict] = {}
  order: list[str] = []
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    record = json.loads(line)
    phase, step = record.pop("phase"), int(record.pop("step"))
    if phase not in order:
      order.append(phase)
    merged.setdefault((phase, step), {}).update(record)
  results = {}
  results_path = run_dir / "results.json"
  if results_path.exists():
    results = json.loads(results_path.read_text())
    order = [p for p in results if p in order] + [p for p in order
                                                  if p not in results]
  if phases:
    if not set(phases) & set(order):
      raise ValueError(f"{workdir} has none of the phases {list(phases)}; "
                       f"it has {order}")
    order = [p for p in order if p in phases]
  series: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
  for phase in order:
    by_name: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
    for (p, step), record in sorted(merged.items()):
      if p == phase:
        for name, value in record.items():
          by_name[name].append((step, _as_float(value)))
    series[phase] = {name: (np.array([s for s, _ in pts]),
                            np.array([v for _, v in pts]))
                     for name, pts in by_name.items()}
  label = label or run_dir.name
  run = Run(workdir=workdir, label=label, phases=order, series=series,
            results=results)
  align_phases([run])
  return run


def _curve(run: Run, name: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
  """(global steps, values) of a metric over the run's phases, or None."""
  xs, ys = [], []
  for phase in run.phases:
    if name in run.series[phase]:
      steps, values = run.series[phase][name]
      xs.append(steps + run.starts[phase])
      ys.append(values)
  if not xs:
    return None
  return np.concatenate(xs), np.concatenate(ys)


def _group(runs: Sequence[Run]) -> dict[str, list[Run]]:
  groups: dict[str, list[Run]] = {}
  for run in runs:
    groups.setdefault(run.label, []).append(run)
  return groups


def _band(runs: Sequence[Run], name: str):
  """Union of steps; mean, min, max over the runs that logged each step."""
  curves = [c for c in (_curve(r, name) for r in runs) if c is not None]
  if not curves:
    return None
  steps = np.unique(np.concatenate([x for x, _ in curves]))
  table = np.full((len(curves), len(steps)), np.nan)
  for i, (x, y) in enumerate(curves):
    table[i, np.searchsorted(steps, x)] = y
  with warnings.catch_warnings():  # an all-NaN column stays NaN, silently
    warnings.simplefilter("ignore", RuntimeWarning)
    return (steps, np.nanmean(table, 0), np.nanmin(table, 0),
            np.nanmax(table, 0))


def _plot_metric(ax, groups: dict[str, list[Run]], name: str, colors: dict,
                 style: str = "-", alpha: float = 1.0,
                 with_label: bool = True) -> bool:
  drawn = False
  for label, runs in groups.items():
    band = _band(runs, name)
    if band is None:
      continue
    steps, mean, lo, hi = band
    ax.plot(steps, mean, style, color=colors[label], alpha=alpha, lw=1.3,
            label=(f"{label} (n={len(runs)})" if len(runs) > 1 else label)
            if with_label else None)
    if len(runs) > 1:
      ax.fill_between(steps, lo, hi, color=colors[label], alpha=0.2 * alpha,
                      lw=0)
    drawn = True
  return drawn


def _phase_lines(ax, run: Run, color: str = "0.6") -> None:
  """Dotted lines at phase boundaries and phase names, inside the x-range."""
  lo, hi = ax.get_xlim()
  for phase, start in run.starts.items():
    end = start + run.lengths[phase]
    if end <= lo or start >= hi or end == start:
      continue
    if start > lo:
      ax.axvline(start, color=color, ls=":", lw=0.8)
    ax.text(max(start, lo), 0.99, f" {phase}",
            transform=ax.get_xaxis_transform(), va="top", ha="left",
            fontsize=7, color="0.3" if color == "0.6" else color)
  ax.set_xlim(lo, hi)


def _colors(groups: dict) -> dict[str, str]:
  cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  return {label: cycle[i % len(cycle)] for i, label in enumerate(groups)}


def _finish(fig, axes, path: str, first: Run) -> None:
  for ax in axes:
    if ax.has_data():
      _phase_lines(ax, first)
      ax.grid(alpha=0.3)
      ax.set_xlabel("step (all phases)", fontsize=8)
      ax.tick_params(labelsize=7)
    else:
      ax.set_visible(False)
  handles, labels = next(((h, l) for h, l in
                          (ax.get_legend_handles_labels() for ax in axes)
                          if h), ([], []))
  if handles:
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6),
               fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
  fig.savefig(path, dpi=90)


def plot_training(runs: Sequence[Run], path: str) -> None:
  """Train loss, top-1 (eval solid, train faint) and learning rate."""
  groups = _group(runs)
  colors = _colors(groups)
  fig = figure.Figure(figsize=(13, 3.8))
  axes = fig.subplots(1, 3)
  _plot_metric(axes[0], groups, "train/loss", colors)
  axes[0].set_title("train loss", fontsize=9)
  _plot_metric(axes[1], groups, "eval/top1", colors)
  _plot_metric(axes[1], groups, "train/top1", colors, alpha=0.3,
               with_label=False)
  axes[1].set_title("top-1 (eval solid, train faint)", fontsize=9)
  _plot_metric(axes[2], groups, "train/lr", colors)
  axes[2].set_title("learning rate", fontsize=9)
  _finish(fig, axes, path, runs[0])


def plot_dynamics(runs: Sequence[Run], path: str) -> bool:
  """The overall dynamics metrics; False (and no file) if none was logged."""
  groups = _group(runs)
  colors = _colors(groups)
  fig = figure.Figure(figsize=(15, 9.5))
  axes = fig.subplots(3, 3).ravel()
  drawn = False
  for ax, (name, title) in zip(axes, DYNAMICS_PANELS):
    if name == "adam_v":
      ok = _plot_metric(ax, groups, DYNAMICS_PREFIX + "adam_v_live", colors)
      ok |= _plot_metric(ax, groups, DYNAMICS_PREFIX + "adam_v_dead", colors,
                         style="--", with_label=False)
      if ok:
        ax.set_yscale("log")
    else:
      ok = _plot_metric(ax, groups, DYNAMICS_PREFIX + name, colors)
    ax.set_title(title, fontsize=9)
    drawn |= ok
  if not drawn:
    return False
  _finish(fig, axes, path, runs[0])
  return True


def _layer_table(run: Run, metric: str):
  """(layer names, global steps, values [layers, steps]) or None."""
  prefix = f"{DYNAMICS_PREFIX}{metric}/"
  names = sorted({n[len(prefix):] for p in run.phases
                  for n in run.series[p] if n.startswith(prefix)})
  if not names:
    return None
  curves = {n: _curve(run, prefix + n) for n in names}
  steps = np.unique(np.concatenate([c[0] for c in curves.values()]))
  table = np.full((len(names), len(steps)), np.nan)
  for i, n in enumerate(names):
    x, y = curves[n]
    table[i, np.searchsorted(steps, x)] = y
  return names, steps, table


def _cell_edges(steps: np.ndarray) -> np.ndarray:
  """Heatmap cell edges centred on the steps (midpoints between them)."""
  if len(steps) == 1:
    return np.array([steps[0] - 0.5, steps[0] + 0.5])
  mid = (steps[1:] + steps[:-1]) / 2
  return np.concatenate([[2 * steps[0] - mid[0]], mid,
                         [2 * steps[-1] - mid[-1]]])


def plot_layers(runs: Sequence[Run], metric: str, path: str) -> bool:
  """Heatmaps layer x step of a per-layer metric, one column per label."""
  groups = _group(runs)
  tables = {label: _layer_table(rs[0], metric) for label, rs in groups.items()}
  tables = {k: v for k, v in tables.items() if v is not None}
  if not tables:
    return False
  finite = np.concatenate([t[2][np.isfinite(t[2])] for t in tables.values()])
  vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (
      0.0, 1.0)
  n_layers = max(len(t[0]) for t in tables.values())
  fig = figure.Figure(
      figsize=(min(4.5 * len(tables) + 2.5, 18), 1.2 + 0.22 * n_layers))
  axes = fig.subplots(1, len(tables), squeeze=False, sharey=True)
  image = None
  for ax, (label, (names, steps, table)) in zip(axes[0], tables.items()):
    edges = _cell_edges(steps)
    image = ax.pcolormesh(edges, np.arange(len(names) + 1), table,
                          vmin=vmin, vmax=vmax, cmap="viridis")
    ax.set_yticks(np.arange(len(names)) + 0.5)
    ax.set_yticklabels(names, fontsize=6)
    ax.set_ylim(len(names), 0)  # first layer on top (axes are shared)
    ax.set_title(f"{label} (first run)" if len(groups[label]) > 1 else label,
                 fontsize=9)
    ax.set_xlabel("step (all phases)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    _phase_lines(ax, groups[label][0], color="w")
  fig.colorbar(image, ax=list(axes[0]), fraction=0.03, pad=0.02)
  fig.suptitle(f"{metric} per layer", fontsize=10)
  fig.savefig(path, dpi=90, bbox_inches="tight")
  return True


def _fmt(values: Sequence[float]) -> str:
  values = [v for v in values if v is not None and not math.isnan(v)]
  if not values:
    return "-"
  mean = float(np.mean(values))
  if len(values) == 1:
    return f"{mean:.4g}"
  return f"{mean:.4g} ± {float(np.std(values)):.2g}"


def _summary(run: Run, phase: str, name: str, how: str) -> Optional[float]:
  """The phase's last logged value of a metric ('end') or its mean ('mean')."""
  series = run.series.get(phase, {}).get(name)
  if series is None:
    return None
  return float(series[1][-1] if how == "end" else np.mean(series[1]))


def write_report(runs: Sequence[Run], out: str, images: Sequence[str]) -> str:
  """report.md: results, last dynamics values per phase, plot links."""
  groups = _group(runs)
  lines = ["# Training analysis", ""]
  lines += ["Runs (label: work directories):", ""]
  for label, rs in groups.items():
    lines.append(f"- **{label}**: " + ", ".join(f"`{r.workdir}`" for r in rs))
  phases = list(dict.fromkeys(p for r in runs for p in r.phases))
  lines += ["", "## Results (top-1 on the evaluation split)", "",
            "Mean ± standard deviation over the runs of a label.", "",
            "| label | phase | final top-1 | best top-1 | steps |",
            "|---|---|---|---|---|"]
  for label, rs in groups.items():
    for phase in phases:
      res = [r.results.get(phase) for r in rs if phase in r.results]
      if res:
        lines.append(
            f"| {label} | {phase} | {_fmt([x['top1'] for x in res])} | "
            f"{_fmt([x['best_top1'] for x in res])} | {res[0]['steps']} |")
  rows = []
  for label, rs in groups.items():
    for phase in phases:
      vals = [_fmt([_summary(r, phase, DYNAMICS_PREFIX + n, how) for r in rs])
              for n, how in REPORT_METRICS]
      if any(v != "-" for v in vals):
        rows.append(f"| {label} | {phase} | " + " | ".join(vals) + " |")
  if rows:
    lines += ["", "## Weight dynamics per phase", "",
              "(`bnn_jax.dynamics`.) *mean*: over the phase's logged steps "
              "(the flip ratio is between consecutive steps, and 0 in a last "
              "epoch at learning rate 0); *end*: at its last logged step. "
              "Adam v: mean second moment over dead / live binary weights.",
              "", "| label | phase | " + " | ".join(
                  f"{n} ({how})" for n, how in REPORT_METRICS) + " |",
              "|---|---|" + "---|" * len(REPORT_METRICS)] + rows
  lines += ["", "## Plots", ""]
  for image in images:
    lines += [f"![{image}]({image})", ""]
  path = os.path.join(out, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def analyze(workdirs: Sequence[str], out: str,
            labels: Optional[Sequence[str]] = None,
            phases: Optional[Sequence[str]] = None) -> list[str]:
  """Writes the plots and report.md of `workdirs` into `out`; returns paths."""
  if labels and len(labels) != len(workdirs):
    raise ValueError(f"{len(labels)} labels for {len(workdirs)} runs; give "
                     "one label per run (equal labels = seeds of a setting)")
  runs = [load_run(w, labels[i] if labels else None, phases)
          for i, w in enumerate(workdirs)]
  align_phases(runs)
  os.makedirs(out, exist_ok=True)
  images = ["training.png"]
  plot_training(runs, os.path.join(out, "training.png"))
  if plot_dynamics(runs, os.path.join(out, "dynamics.png")):
    images.append("dynamics.png")
  for metric in LAYER_METRICS:
    name = f"layers_{metric}.png"
    if plot_layers(runs, metric, os.path.join(out, name)):
      images.append(name)
  report = write_report(runs, out, images)
  return [os.path.join(out, i) for i in images] + [report]


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m bnn_jax.analyze",
      description="Plots (PNG) and a markdown report of training runs.")
  parser.add_argument("--workdir", required=True, help="a run directory")
  parser.add_argument("--compare", nargs="*", action="extend", default=[],
                      help="more run directories, drawn alongside")
  parser.add_argument("--labels", nargs="*", default=None,
                      help="one label per run (workdir first); runs with "
                      "the same label are aggregated as seeds")
  parser.add_argument("--phases", nargs="*", default=None,
                      help="only these phases (default: all)")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--debug", action="store_true",
                      help="show full tracebacks on errors")
  args = parser.parse_args(argv)
  with cli.reporting_errors(debug=args.debug):
    paths = analyze([args.workdir, *args.compare], args.out, args.labels,
                    args.phases)
  for path in paths:
    print(path)


if __name__ == "__main__":
  main()
