"""Matplotlib figures for reports (certified-accuracy curves, robust-accuracy
curves, eta heat maps, decoupling ASR, missing modality). Each function draws
one figure on the shared skeleton (`_save_figure`: figure, axes, labels, legend,
save) and writes it as a PNG to the given path. Figures are made with
`matplotlib.figure.Figure` directly, not pyplot: no display, and the process's
backend is left alone."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
import numpy as np

Curves = Mapping[str, tuple[Sequence[float], Sequence[float]]]
_TAB20 = colormaps["tab20"]


def _save_figure(path: Any, draw: Callable[[Figure, Axes], None], *,
                 size: tuple[float, float] = (5.0, 3.6), xlabel: str | None = None,
                 ylabel: str | None = None, title: str | None = None,
                 ylim: tuple[float, float] | None = (0.0, 1.02), xmin: float | None = 0.0,
                 grid: str | None = "both", legend: dict[str, Any] | None = None) -> Any:
  """The skeleton of every figure: `draw(fig, ax)` on a new figure, then labels,
  limits, grid, legend (`legend`: its keyword arguments; None: no legend),
  title, and a PNG saved to `path` (a file name or a binary file; returned)."""
  fig = Figure(figsize=size)
  ax = fig.subplots()
  draw(fig, ax)
  if xlabel:
    ax.set_xlabel(xlabel)
  if ylabel:
    ax.set_ylabel(ylabel)
  if ylim is not None:
    ax.set_ylim(*ylim)
  if xmin is not None:
    ax.set_xlim(left=xmin)
  if grid:
    ax.grid(alpha=0.3, axis=grid)
  if legend is not None:
    ax.legend(**legend)
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120, format="png")
  return path


def _checked_curves(curves: Curves, plot: str, x_name: str, y_name: str
                    ) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
  """(name, x [T], y [T]) of each curve; ValueError naming the plot and the curve."""
  if not curves:
    raise ValueError(f"{plot}: expected at least one curve")
  for name, (x, y) in curves.items():
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1:
      raise ValueError(f"{plot}: curve {name!r} has {x_name} {x.shape} and {y_name} "
                       f"{y.shape}; expected two [T] arrays")
    yield str(name), x, y


def _line_figure(curves: Curves, path: Any, plot: str, names: tuple[str, str],
                 draw_line: Callable[[Axes, str, np.ndarray, np.ndarray], Any],
                 **figure) -> Any:
  """One `draw_line(ax, name, x, y)` per checked curve on the `_save_figure` skeleton."""
  lines = list(_checked_curves(curves, plot, *names))

  def draw(fig, ax):
    del fig
    for name, x, y in lines:
      draw_line(ax, name, x, y)

  return _save_figure(path, draw, **figure)


def plot_certified_accuracy(curves: Curves, path, *, title=None, xlabel="l2 radius",
                            ylabel="certified accuracy", linestyles=None, colors=None) -> Any:
  """Certified accuracy versus radius, one line per curve (e.g. per Lipschitz kind).

  Args:
    curves: name -> (radii [T], accuracy [T]) (e.g. {"sound": ..., "local": ...}).
    path: the PNG file to write (a file name or a binary file).
    linestyles: optional name -> matplotlib line style (e.g. "--").
    colors: optional name -> matplotlib colour (e.g. one per method, shared by
      its curves); default: the colour cycle.
  Returns:
    `path`. More than six curves get a wider figure with the legend beside the axes.
  """
  def draw_line(ax, name, radii, accuracy):
    ax.step(radii, accuracy, where="post", label=name,
            linestyle=(linestyles or {}).get(name, "-"), color=(colors or {}).get(name))

  many = len(curves) > 6
  legend = ({"fontsize": "small", "loc": "upper left", "bbox_to_anchor": (1.02, 1.0)} if many
            else {"fontsize": "small" if len(curves) > 5 else None})
  return _line_figure(curves, path, "plot_certified_accuracy", ("radii", "accuracy"), draw_line,
                      xlabel=xlabel, ylabel=ylabel, title=title, legend=legend,
                      size=(8.5, 4.2) if many else (5.0, 3.6))


def plot_eta_ratio_heatmap(ratio, path, *, numerator, denominator, class_names=None,
                           title=None, log_scale=True) -> Any:
  """Heat map of the vulnerability-indicator ratio `eta^(num) / eta^(den)` over class
  pairs (row: true class y, column: other class k), as in CRMT Fig. 3.

  Args:
    ratio: [K, K] ratios (NaN cells, e.g. the diagonal, are left blank).
    path: the PNG file to write (a file name or a binary file).
    numerator, denominator: modality names for the colour-bar label.
    log_scale: colour by log10 of the ratio (balanced modalities at 0).
  Returns:
    `path`.
  """
  ratio = np.asarray(ratio, float)
  if ratio.ndim != 2 or ratio.shape[0] != ratio.shape[1]:
    raise ValueError(f"plot_eta_ratio_heatmap: expected a [K, K] ratio, got {ratio.shape}")
  k = ratio.shape[0]
  names = [str(i) for i in range(k)] if class_names is None else [str(c) for c in class_names]
  if len(names) != k:
    raise ValueError(f"plot_eta_ratio_heatmap: expected {k} class names, got {len(names)}")
  with np.errstate(divide="ignore", invalid="ignore"):
    shown = np.where(ratio > 0, np.log10(ratio), np.nan) if log_scale else ratio
  label = f"eta^({numerator}) / eta^({denominator})"
  step = max(1, k // 20)

  def draw(fig, ax):
    image = ax.imshow(np.ma.masked_invalid(shown), cmap="magma")
    fig.colorbar(image, ax=ax, label=f"log10 {label}" if log_scale else label)
    ax.set_xticks(range(0, k, step), names[::step], rotation=90)
    ax.set_yticks(range(0, k, step), names[::step])

  size = max(3.5, 0.28 * k + 2.0)
  return _save_figure(path, draw, size=(size + 1.0, size), xlabel="other class k",
                      ylabel="true class y", title=title, ylim=None, xmin=None, grid=None,
                      legend=None)


def distinct_styles(names: Sequence[str]) -> dict[str, dict[str, Any]]:
  """Matplotlib line styles that tell up to 20 curves apart: a colour of "tab20"
  each, with the line style and marker cycling too (so that no two curves
  share colour and style even when printed in grey)."""
  colours = [f"C{i}" for i in range(10)] if len(names) <= 10 else [
      _TAB20(i / 20) for i in range(20)]
  dashes, markers = ("-", "--", "-.", ":"), ("o", "s", "^", "D", "v")
  return {name: {"color": colours[i % len(colours)], "linestyle": dashes[i % len(dashes)],
                 "marker": markers[i % len(markers)]} for i, name in enumerate(names)}


def plot_robust_accuracy(curves: Curves, path, *, clean_accuracy=None, title=None,
                         xlabel="l2 attack size eps (normalised space)",
                         ylabel="robust accuracy",
                         styles: Mapping[str, Mapping[str, Any]] | None = None,
                         bands: Curves | None = None, log_x: bool = False) -> Any:
  """Robust accuracy versus attack size, one line per attacked scope (CRMT Fig. 1/4:
  e.g. "multi", and one line per modality for uni-modal attacks).

  Args:
    curves: name -> (eps [T], accuracy [T]).
    path: the PNG file to write (a file name or a binary file).
    clean_accuracy: drawn as the eps = 0 point of every curve when given.
    styles: optional name -> matplotlib line keyword arguments (`distinct_styles`).
    bands: optional name -> (low [T], high [T]) shaded around that curve (e.g.
      the spread over seeds), in the curve's colour.
    log_x: a logarithmic eps axis (for grids that double).
  Returns:
    `path`.
  """
  def draw_line(ax, name, eps, accuracy):
    if clean_accuracy is not None:
      eps = np.concatenate([[0.0], eps])
      accuracy = np.concatenate([[clean_accuracy], accuracy])
    style = {"marker": "o", **dict((styles or {}).get(name, {}))}
    (line,) = ax.plot(eps, accuracy, markersize=3, label=name, **style)
    if bands and name in bands:
      low, high = (np.asarray(v, float) for v in bands[name])
      ax.fill_between(eps[-len(low):], low, high, color=line.get_color(), alpha=0.15,
                      linewidth=0)
    if log_x:
      ax.set_xscale("log", base=2)

  return _line_figure(curves, path, "plot_robust_accuracy", ("eps", "accuracy"), draw_line,
                      xlabel=xlabel, ylabel=ylabel, title=title, xmin=None if log_x else 0.0,
                      legend={"fontsize": "small" if len(curves) > 5 else None})


def plot_eta_ratio_heatmaps(ratios: Mapping[str, Any], path, *, numerator: str,
                            denominator: str, limit: float | None = None,
                            title: str | None = None) -> Any:
  """CRMT Fig. 3 for several models side by side on ONE colour scale: log10 of
  `eta^(numerator) / eta^(denominator)` over class pairs (row y, column k),
  diverging around 0 (balanced), limits +-`limit` (default: the largest
  |log10 ratio| of all panels), so that colours compare across models.

  Args:
    ratios: model name -> [K, K] ratio (NaN cells left blank).
    path: the PNG file to write.
  Returns:
    `path`.
  """
  if not ratios:
    raise ValueError("plot_eta_ratio_heatmaps: expected at least one model")
  shown = {}
  for name, ratio in ratios.items():
    ratio = np.asarray(ratio, float)
    if ratio.ndim != 2 or ratio.shape[0] != ratio.shape[1]:
      raise ValueError(f"plot_eta_ratio_heatmaps: expected a [K, K] ratio for {name!r}, got "
                       f"{ratio.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
      shown[name] = np.where(ratio > 0, np.log10(ratio), np.nan)
  finite = np.concatenate([v[np.isfinite(v)] for v in shown.values()] + [np.zeros(1)])
  limit = float(limit if limit is not None else max(np.abs(finite).max(), 1e-3))
  fig = Figure(figsize=(3.2 * len(shown) + 1.2, 3.6))
  axes = np.atleast_1d(fig.subplots(1, len(shown)))
  for ax, (name, values) in zip(axes, shown.items()):
    image = ax.imshow(np.ma.masked_invalid(values), cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_title(f"{name}: mean |log10| {np.nanmean(np.abs(values)):.2f}", fontsize="small")
    ax.set_xlabel("other class k")
  axes[0].set_ylabel("true class y")
  fig.colorbar(image, ax=list(axes), label=f"log10 eta^({numerator}) / eta^({denominator})")
  if title:
    fig.suptitle(title)
  fig.savefig(path, dpi=120, format="png")
  return path


def plot_points(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path, *,
                xlabel: str, ylabel: str, title: str | None = None,
                errors: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
                lines: bool = False, zero_lines: bool = True) -> Any:
  """Points (x, y) per series, e.g. a scatter of eta ratio against attack gap,
  or a measured effect against a dialled setting (`lines`), with optional
  vertical intervals `errors` (name -> (low [T], high [T]))."""
  checked = list(_checked_curves(series, "plot_points", "x", "y"))
  styles = distinct_styles([name for name, _, _ in checked])

  def draw(fig, ax):
    del fig
    for name, x, y in checked:
      style = dict(styles[name], linestyle=styles[name]["linestyle"] if lines else "none")
      if errors and name in errors:
        low, high = (np.asarray(v, float) for v in errors[name])
        ax.errorbar(x, y, yerr=[y - low, high - y], capsize=3, label=name, markersize=4,
                    **style)
      else:
        ax.plot(x, y, label=name, markersize=4, alpha=0.8, **style)
    if zero_lines:
      ax.axhline(0, color="grey", linewidth=0.8)
      if not lines:
        ax.axvline(0, color="grey", linewidth=0.8)

  return _save_figure(path, draw, size=(5.4, 4.0), xlabel=xlabel, ylabel=ylabel, title=title,
                      ylim=None, xmin=None, legend={"fontsize": "small"})


def plot_decoupling_asr(curves: Curves, path, *, title=None,
                        xlabel="fraction of input entries changed (%)",
                        ylabel="attack success rate") -> Any:
  """Decoupling-attack (MUROAN) success rate versus the l0 budget, one line per scope.

  Args:
    curves: name -> (fraction [T] in [0, 1], asr [T]).
    path: the PNG file to write (a file name or a binary file).
  Returns:
    `path`.
  """
  def draw_line(ax, name, fraction, asr):
    ax.plot(100.0 * fraction, asr, marker="o", markersize=3, label=name)

  return _line_figure(curves, path, "plot_decoupling_asr", ("fraction", "asr"), draw_line,
                      xlabel=xlabel, ylabel=ylabel, title=title, legend={})


def plot_missing_modality(accuracy: Mapping[str, Mapping[str, float]], path, *,
                          clean_accuracy=None, title=None, ylabel="accuracy") -> Any:
  """Grouped bars: accuracy with each modality missing, one bar per fill.

  Args:
    accuracy: modality -> {fill: accuracy}.
    path: the PNG file to write (a file name or a binary file).
    clean_accuracy: drawn as a horizontal reference line when given.
  Returns:
    `path`.
  """
  if not accuracy:
    raise ValueError("plot_missing_modality: expected at least one modality")
  modalities = list(accuracy)
  fills = sorted({f for per_fill in accuracy.values() for f in per_fill})
  width = 0.8 / max(len(fills), 1)
  positions = np.arange(len(modalities))

  def draw(fig, ax):
    del fig
    for i, fill in enumerate(fills):
      values = [accuracy[m].get(fill, np.nan) for m in modalities]
      ax.bar(positions + (i - (len(fills) - 1) / 2) * width, values, width, label=fill)
    if clean_accuracy is not None:
      ax.axhline(clean_accuracy, color="black", linestyle="--", linewidth=1, label="clean")
    ax.set_xticks(positions, [f"without {m}" for m in modalities])

  return _save_figure(path, draw, size=(max(4.0, 1.2 * len(modalities) + 2.0), 3.6),
                      ylabel=ylabel, title=title, xmin=None, grid="y", legend={})
