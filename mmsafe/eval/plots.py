"""Matplotlib figures for reports (certified-accuracy curves, robust-accuracy
curves, eta heat maps, decoupling ASR). Each function draws one figure and saves
it as a PNG to the given path. Figures are made with `matplotlib.figure.Figure`
directly, not pyplot: no display, and the process's backend is left alone."""

from __future__ import annotations

from matplotlib.figure import Figure
import numpy as np


def plot_certified_accuracy(curves, path, *, title=None, xlabel="l2 radius",
                            ylabel="certified accuracy", linestyles=None):
  """Certified accuracy versus radius, one line per curve (e.g. per Lipschitz kind).

  Args:
    curves: name -> (radii [T], accuracy [T]) (e.g. {"sound": ..., "local": ...}).
    path: the PNG file to write.
    linestyles: optional name -> matplotlib line style (e.g. "--").
  Returns:
    `path`.
  """
  if not curves:
    raise ValueError("plot_certified_accuracy: expected at least one curve")
  fig = Figure(figsize=(5.0, 3.6))
  ax = fig.subplots()
  for name, (radii, accuracy) in curves.items():
    radii, accuracy = np.asarray(radii, float), np.asarray(accuracy, float)
    if radii.shape != accuracy.shape or radii.ndim != 1:
      raise ValueError(f"plot_certified_accuracy: curve {name!r} has radii {radii.shape} and "
                       f"accuracy {accuracy.shape}; expected two [T] arrays")
    ax.step(radii, accuracy, where="post", label=str(name),
            linestyle=(linestyles or {}).get(name, "-"))
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_ylim(0.0, 1.02)
  ax.set_xlim(left=0.0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small" if len(curves) > 5 else None)
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def plot_eta_ratio_heatmap(ratio, path, *, numerator, denominator, class_names=None,
                           title=None, log_scale=True):
  """Heat map of the vulnerability-indicator ratio `eta^(num) / eta^(den)` over class
  pairs (row: true class y, column: other class k), as in CRMT Fig. 3.

  Args:
    ratio: [K, K] ratios (NaN cells, e.g. the diagonal, are left blank).
    path: the PNG file to write.
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
  masked = np.ma.masked_invalid(shown)
  size = max(3.5, 0.28 * k + 2.0)
  fig = Figure(figsize=(size + 1.0, size))
  ax = fig.subplots()
  image = ax.imshow(masked, cmap="magma")
  label = f"eta^({numerator}) / eta^({denominator})"
  fig.colorbar(image, ax=ax, label=f"log10 {label}" if log_scale else label)
  step = max(1, k // 20)
  ax.set_xticks(range(0, k, step), names[::step], rotation=90)
  ax.set_yticks(range(0, k, step), names[::step])
  ax.set_xlabel("other class k")
  ax.set_ylabel("true class y")
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def plot_robust_accuracy(curves, path, *, clean_accuracy=None, title=None,
                         xlabel="l2 attack size eps (normalised space)",
                         ylabel="robust accuracy"):
  """Robust accuracy versus attack size, one line per attacked scope (CRMT Fig. 1/4:
  e.g. "multi", and one line per modality for uni-modal attacks).

  Args:
    curves: name -> (eps [T], accuracy [T]).
    path: the PNG file to write.
    clean_accuracy: drawn as the eps = 0 point of every curve when given.
  Returns:
    `path`.
  """
  if not curves:
    raise ValueError("plot_robust_accuracy: expected at least one curve")
  fig = Figure(figsize=(5.0, 3.6))
  ax = fig.subplots()
  for name, (eps, accuracy) in curves.items():
    eps, accuracy = np.asarray(eps, float), np.asarray(accuracy, float)
    if eps.shape != accuracy.shape or eps.ndim != 1:
      raise ValueError(f"plot_robust_accuracy: curve {name!r} has eps {eps.shape} and "
                       f"accuracy {accuracy.shape}; expected two [T] arrays")
    if clean_accuracy is not None:
      eps, accuracy = np.concatenate([[0.0], eps]), np.concatenate([[clean_accuracy], accuracy])
    ax.plot(eps, accuracy, marker="o", markersize=3, label=str(name))
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_ylim(0.0, 1.02)
  ax.set_xlim(left=0.0)
  ax.grid(alpha=0.3)
  ax.legend()
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def plot_decoupling_asr(curves, path, *, title=None,
                        xlabel="fraction of input entries changed (%)",
                        ylabel="attack success rate"):
  """Decoupling-attack (MUROAN) success rate versus the l0 budget, one line per scope.

  Args:
    curves: name -> (fraction [T] in [0, 1], asr [T]).
    path: the PNG file to write.
  Returns:
    `path`.
  """
  if not curves:
    raise ValueError("plot_decoupling_asr: expected at least one curve")
  fig = Figure(figsize=(5.0, 3.6))
  ax = fig.subplots()
  for name, (fraction, asr) in curves.items():
    fraction, asr = np.asarray(fraction, float), np.asarray(asr, float)
    if fraction.shape != asr.shape or fraction.ndim != 1:
      raise ValueError(f"plot_decoupling_asr: curve {name!r} has fraction {fraction.shape} "
                       f"and asr {asr.shape}; expected two [T] arrays")
    ax.plot(100.0 * fraction, asr, marker="o", markersize=3, label=str(name))
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_ylim(0.0, 1.02)
  ax.set_xlim(left=0.0)
  ax.grid(alpha=0.3)
  ax.legend()
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def plot_missing_modality(accuracy, path, *, clean_accuracy=None, title=None,
                          ylabel="accuracy"):
  """Grouped bars: accuracy with each modality missing, one bar per fill.

  Args:
    accuracy: modality -> {fill: accuracy}.
    path: the PNG file to write.
    clean_accuracy: drawn as a horizontal reference line when given.
  Returns:
    `path`.
  """
  if not accuracy:
    raise ValueError("plot_missing_modality: expected at least one modality")
  modalities = list(accuracy)
  fills = sorted({f for per_fill in accuracy.values() for f in per_fill})
  width = 0.8 / max(len(fills), 1)
  fig = Figure(figsize=(max(4.0, 1.2 * len(modalities) + 2.0), 3.6))
  ax = fig.subplots()
  positions = np.arange(len(modalities))
  for i, fill in enumerate(fills):
    values = [accuracy[m].get(fill, np.nan) for m in modalities]
    ax.bar(positions + (i - (len(fills) - 1) / 2) * width, values, width, label=fill)
  if clean_accuracy is not None:
    ax.axhline(clean_accuracy, color="black", linestyle="--", linewidth=1, label="clean")
  ax.set_xticks(positions, [f"without {m}" for m in modalities])
  ax.set_ylabel(ylabel)
  ax.set_ylim(0.0, 1.02)
  ax.grid(alpha=0.3, axis="y")
  ax.legend()
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path
