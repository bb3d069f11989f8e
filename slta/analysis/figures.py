"""The paper's figures, drawn from `slta analyze`'s linearity.json and a merge's slta_report.json.

  fig2_nonlinearity_score.png   Figure 2: Non-linearity Score per level, one group per fine-tuned model
  fig3_projection_distance.png  Figure 3: projection distance (Eq. 8) per level, 2- and 3-model merges
  fig4_cosine.png               Figure 4: 1 - E_α cosine_merge (Eq. 16) vs 1 - cosine_base (Eq. 17)
  fig6_distance_matrix.png      Figure 6: D(f(θ_i), f(θ_j)) / D(f(θ_N), f(θ_0)) next to the ideal |i-j|/N
  interpolation_curves.png      Table 18: D(f(θ_0 + ατ), f(θ)) / D(f(θ_0), f(θ)) against α
  fig5_alpha.png                Figure 5 (`slta report MERGED`): every module's α as a heatmap
  accuracy chart                the demo's exact match per method (`accuracy_chart`)

Figures are built on matplotlib's object API (no pyplot state, no display needed).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure

LEVEL_LABELS = {"model": "Model", "layer": "Layer", "attn": "Attn", "mlp": "MLP", "head": "Head"}
COLORS = {"model": "#4c72b0", "layer": "#dd8452", "attn": "#55a868", "mlp": "#c44e52", "head": "#8172b3"}


def _names(data: dict[str, Any]) -> list[str]:
    return [Path(m).name for m in data["models"]]


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    return path


def _val(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _headroom(ax: Any) -> None:
    """y from 0 with room above the tallest bar + error bar for the value labels."""
    lo, hi = ax.get_ylim()
    ax.set_ylim(0, hi * 1.15 if hi > 0 else 1)


def fig2_scores(data: dict[str, Any], path: Path) -> Path:
    """Figure 2: Non-linearity Score (Eq. 19) per level, a group of bars per fine-tuned model."""
    score = data["summary"]["score"]
    levels = list(score)
    names = _names(data)
    fig = Figure(layout="constrained", figsize=(max(5.0, 1.3 * len(names) * max(1, len(levels)) / 2.5), 3.8))
    ax = fig.subplots()
    width = 0.8 / max(1, len(levels))
    x = np.arange(len(names))
    for j, level in enumerate(levels):
        means = [_val(e["mean"]) for e in score[level]]
        stds = [_val(e["std"]) for e in score[level]]
        bars = ax.bar(x + (j - (len(levels) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
                      label=LEVEL_LABELS.get(level, level), color=COLORS.get(level))
        ax.bar_label(bars, fmt="%.2g", fontsize=6, padding=2, rotation=90)
    ax.set_xticks(x, names)
    ax.set_ylabel("Non-linearity Score (Eq. 19)")
    ax.set_title(f"Non-linearity Score per level (N={data['steps']}; lower is more linear)")
    _headroom(ax)
    ax.legend(fontsize=8)
    ax.set_xlabel("fine-tuned model (error bars: std over modules; model level: over samples)", fontsize=8)
    return _save(fig, path)


def _merge_sizes(data: dict[str, Any]) -> list[str]:
    return sorted({k for per in data["summary"]["merging"].values() for k in per}, key=int)


def fig3_projection(data: dict[str, Any], path: Path) -> Path:
    """Figure 3: projection distance (Eq. 8) per level for 2- and 3-model merges."""
    merging = data["summary"]["merging"]
    sizes = _merge_sizes(data)
    fig = Figure(layout="constrained", figsize=(4.2 * len(sizes), 3.6))
    axes = np.atleast_1d(fig.subplots(1, len(sizes)))
    for ax, size in zip(axes, sizes):
        levels = [lv for lv in merging if size in merging[lv]]
        means = [_val(merging[lv][size]["projection_distance"]["mean"]) for lv in levels]
        stds = [_val(merging[lv][size]["projection_distance"]["std"]) for lv in levels]
        bars = ax.bar([LEVEL_LABELS.get(lv, lv) for lv in levels], means, yerr=stds, capsize=3,
                      color=[COLORS.get(lv) for lv in levels])
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
        ax.set_title(f"merging {size} models (α grid {data['merge_grids'].get(size)})", fontsize=9)
        ax.set_ylabel("projection distance (Eq. 8)")
        _headroom(ax)
    fig.suptitle("Projection distance per level (lower is more linear)", fontsize=10)
    return _save(fig, path)


def fig4_cosine(data: dict[str, Any], path: Path) -> Path:
    """Figure 4: 1 - E_α cosine_merge (Eq. 15-16) next to the baseline 1 - cosine_base (Eq. 17)."""
    merging = data["summary"]["merging"]
    sizes = _merge_sizes(data)
    fig = Figure(layout="constrained", figsize=(4.6 * len(sizes), 3.6))
    axes = np.atleast_1d(fig.subplots(1, len(sizes)))
    for ax, size in zip(axes, sizes):
        levels = [lv for lv in merging if size in merging[lv]]
        x = np.arange(len(levels))
        for off, key, label, color in ((-0.2, "one_minus_cosine_merge", "1 - cosine_merge", "#4c72b0"),
                                       (0.2, "one_minus_cosine_base", "1 - cosine_base (baseline)", "#bbbbbb")):
            means = [_val(merging[lv][size][key]["mean"]) for lv in levels]
            stds = [_val(merging[lv][size][key]["std"]) for lv in levels]
            bars = ax.bar(x + off, means, 0.4, yerr=stds, capsize=3, label=label, color=color)
            ax.bar_label(bars, fmt="%.3g", fontsize=6, padding=2)
        ax.set_xticks(x, [LEVEL_LABELS.get(lv, lv) for lv in levels])
        ax.set_title(f"merging {size} models", fontsize=9)
        _headroom(ax)
        ax.legend(fontsize=7)
    fig.suptitle("Cosine similarity per level (lower 1 - cosine_merge is more linear)", fontsize=10)
    return _save(fig, path)


def default_fig6_modules(data: dict[str, Any]) -> list[str]:
    """As the paper's Figure 6: the model, a middle layer and that layer's MLP (or what was analysed)."""
    mid = data["num_layers"] // 2
    want = ["model", f"layers.{mid}"]
    want += [next((m for m in (f"layers.{mid}.mlp", f"layers.{mid}.attn", f"layers.{mid}.head.0")
                   if m in data["modules"]), "")]
    return [m for m in want if m in data["modules"]] or list(data["modules"])[:1]


def fig6_matrices(data: dict[str, Any], path: Path, modules: Sequence[str] | None = None) -> Path:
    """Figure 6: the mean normalised distance matrix of each chosen module, per fine-tuned model,
    next to the ideal |i - j| / N."""
    modules = list(modules or default_fig6_modules(data))
    names = _names(data)
    n = data["steps"]
    k = np.arange(n + 1)
    ideal = np.abs(k[:, None] - k[None, :]) / n
    mats = {m: [np.array(data["modules"][m]["distance_matrix"][t], dtype=float) for t in range(len(names))]
            for m in modules}
    vmax = max([1.0] + [float(np.nanmax(a)) for ms in mats.values() for a in ms if np.isfinite(a).any()])
    cols = 1 + len(modules)
    fig = Figure(layout="constrained", figsize=(2.9 * cols + 0.8, 2.7 * len(names)))
    axes = np.array(fig.subplots(len(names), cols, squeeze=False))
    im = None
    for t, name in enumerate(names):
        panels = [("ideal |i-j|/N", ideal)] + [(m, mats[m][t]) for m in modules]
        for ax, (title, a) in zip(axes[t], panels):
            im = ax.imshow(a, vmin=0, vmax=vmax, cmap="viridis", origin="upper")
            score = "" if title.startswith("ideal") else \
                f"\nscore {_val(data['modules'][title]['score']['mean'][t]):.4g}"
            ax.set_title(f"{name}: {title}{score}" if not title.startswith("ideal") else title, fontsize=8)
            ax.set_xlabel("j", fontsize=7)
            ax.set_ylabel("i", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="D(f(θ_i), f(θ_j)) / D(f(θ_N), f(θ_0))")
    return _save(fig, path)


def interpolation_curves(data: dict[str, Any], path: Path) -> Path:
    """Table 18 as curves: D(f(θ_0 + ατ), f(θ)) / D(f(θ_0), f(θ)) per level, mean ± std over modules."""
    curve = data["summary"]["curve"]
    names = _names(data)
    alphas = np.array(data["interpolation_alphas"])
    fig = Figure(layout="constrained", figsize=(3.6 * len(names), 3.4))
    axes = np.atleast_1d(fig.subplots(1, len(names), sharey=True))
    for t, (ax, name) in enumerate(zip(axes, names)):
        ax.plot(alphas, 1 - alphas, "k--", lw=1, label="ideal linearity")
        for level, per_model in curve.items():
            e = per_model[t]
            if e["mean"] is None:
                continue
            m, s = np.array(e["mean"], dtype=float), np.array(e["std"], dtype=float)
            ax.plot(alphas, m, "o-", ms=3, lw=1.2, color=COLORS.get(level), label=LEVEL_LABELS.get(level, level))
            ax.fill_between(alphas, m - s, m + s, color=COLORS.get(level), alpha=0.15, lw=0)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("α")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("D(f(θ_0+ατ), f(θ)) / D(f(θ_0), f(θ))")
    axes[0].legend(fontsize=7)
    fig.suptitle("Interpolation curves (Table 18)", fontsize=10)
    return _save(fig, path)


def draw_analysis(data: dict[str, Any], out: str | Path, modules: Sequence[str] | None = None) -> list[Path]:
    """Every figure the analysis supports, into folder `out`."""
    out = Path(out)
    paths = [fig2_scores(data, out / "fig2_nonlinearity_score.png"),
             interpolation_curves(data, out / "interpolation_curves.png"),
             fig6_matrices(data, out / "fig6_distance_matrix.png", modules)]
    if data["summary"]["merging"]:
        paths += [fig3_projection(data, out / "fig3_projection_distance.png"),
                  fig4_cosine(data, out / "fig4_cosine.png")]
    return paths


# -- the demo's accuracy chart ------------------------------------------------------------------------

# One colour family per kind of method, one shade per method (13 methods overflow a 10-colour cycle):
# references grey, data-free baselines warm, RegMean green, slta blue and hatched.
FAMILIES = {"reference": ["#3f3f3f", "#a8a8a8"],
            "baseline": ["#7f2704", "#f16913", "#b2182b", "#fdae6b", "#e7298a", "#d9a300", "#fcbba1"],
            "data": ["#1b7837", "#7fbf7b"],
            "slta": ["#08306b", "#2171b5", "#6baed6", "#c6dbef"]}
REFERENCE_ROWS = ("Base Model", "Fine-tuned Model")


def method_family(name: str) -> str:
    if name in REFERENCE_ROWS:
        return "reference"
    if name.lower().startswith("slta"):
        return "slta"
    return "data" if name.lower().startswith("regmean") else "baseline"


def method_colors(names: Sequence[str]) -> dict[str, str]:
    """A distinct colour per method, shades of its family's hue (spread when the family has more
    methods than listed shades)."""
    from matplotlib.colors import LinearSegmentedColormap, to_hex

    groups: dict[str, list[str]] = {}
    for n in dict.fromkeys(names):
        groups.setdefault(method_family(n), []).append(n)
    out = {}
    for fam, members in groups.items():
        shades = FAMILIES[fam]
        if len(members) > len(shades):
            cmap = LinearSegmentedColormap.from_list(fam, shades)
            shades = [to_hex(cmap(x)) for x in np.linspace(0, 1, len(members))]
        out.update(zip(members, shades))
    return out


def accuracy_figure(rows: Sequence[tuple[str, Sequence[tuple[float, float | None]]]], combos: Sequence[str],
                    title: str) -> Figure:
    """Grouped bars: one group per model combination, one bar per method (mean, error bar = std)."""
    colors = method_colors([name for name, _ in rows])
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(combos))
    for k, (name, cells) in enumerate(rows):
        stds = [s or 0 for _, s in cells]
        slta_row = method_family(name) == "slta"
        ax.bar(x + k * width, [m for m, _ in cells], width, yerr=stds if any(stds) else None, capsize=2,
               label=name, color=colors[name], hatch="///" if slta_row else None,
               edgecolor="white" if slta_row else colors[name], linewidth=0)
    ax.set_xticks(x + width * (len(rows) - 1) / 2, list(combos))
    ax.set_ylabel("average exact match (%)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="hatched: slta", title_fontsize=7)
    return fig


def accuracy_chart(rows: Sequence[tuple[str, Sequence[tuple[float, float | None]]]], combos: Sequence[str],
                   title: str, path: str | Path) -> Path:
    return _save(accuracy_figure(rows, combos, title), Path(path))


# -- Figure 5: the α of every module of a merge --------------------------------------------------------

_LAYER = re.compile(r"^layers\.(\d+)(?:\.(.+))?$")
OUTER_ROW = "outside layers"


def _row_key(row: str) -> tuple:
    order = {"layer": 0, "attn": 1, "head": 2, "mlp": 3}
    base, _, rest = row.partition(".")
    return (order.get(base, 4), int(rest) if rest.isdigit() else 0, row)


def alpha_grid(modules: dict[str, dict[str, Any]]) -> tuple[list[str], list[str], np.ndarray]:
    """(row labels, column labels, α of shape (T, rows, cols)): columns are the modules outside the
    layers that come first (embed), the layers, then the others (head, lm_head...); rows are
    OUTER_ROW (those outside modules) then the kinds inside a layer (layer | attn, head.g, mlp |
    linear names). Missing cells are NaN."""
    rows: set[str] = set()
    layers: set[int] = set()
    outer_in, outer_out = [], []
    for name in modules:
        m = _LAYER.match(name)
        if m:
            layers.add(int(m.group(1)))
            rows.add(m.group(2) or "layer")
        elif name.startswith("embed"):
            outer_in.append(name)
        else:
            outer_out.append(name)
    # modules outside the layers (embed, head, the whole model) get their own row: in row 0 they
    # would read as that layer kind's α (e.g. attention)
    row_labels = ([OUTER_ROW] if outer_in or outer_out else []) + sorted(rows, key=_row_key)
    cols = outer_in + [str(i) for i in sorted(layers)] + outer_out
    T = len(next(iter(modules.values()))["alpha"])
    grid = np.full((T, len(row_labels), len(cols)), np.nan)
    for name, info in modules.items():
        m = _LAYER.match(name)
        if m:
            r, c = row_labels.index(m.group(2) or "layer"), cols.index(m.group(1))
        else:
            r, c = 0, cols.index(name)  # OUTER_ROW
        grid[:, r, c] = info["alpha"]
    return row_labels, cols, grid


def alpha_norm(grid: np.ndarray) -> tuple[Normalize, str]:
    """The colour scale of Figure 5: α's own range (a scale centred at 0 leaves half its colours
    unused when every α is positive); diverging at 0 only when α takes both signs."""
    finite = grid[np.isfinite(grid)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    if lo < 0 < hi:
        return TwoSlopeNorm(0.0, lo, hi), "RdBu_r"
    return Normalize(lo, hi), "viridis"


def fig5_alpha(report: dict[str, Any], path: str | Path) -> Path:
    """Figure 5: each module's merge weight α_t as a heatmap, one panel per fine-tuned model."""
    return _save(fig5_figure(report), Path(path))


def fig5_figure(report: dict[str, Any]) -> Figure:
    """Figure 5 as a matplotlib Figure (see fig5_alpha)."""
    modules = report.get("modules") or {}
    if not modules or not all("alpha" in v for v in modules.values()):
        raise ValueError("this merge report has no per-module α (only `merge_method: slta` merges have them)")
    rows, cols, grid = alpha_grid(modules)
    names = [Path(m).name for m in report.get("models", [])] or [f"model {t + 1}" for t in range(grid.shape[0])]
    T = grid.shape[0]
    norm, cmap = alpha_norm(grid)
    w = min(22.0, max(4.0, 0.32 * len(cols) + 2))
    h = max(1.6, 0.28 * len(rows) + 1.1)
    fig = Figure(layout="constrained", figsize=(w, h * T + 0.6))
    axes = np.atleast_1d(fig.subplots(T, 1, squeeze=False)[:, 0])
    im = None
    for t, ax in enumerate(axes):
        masked = np.ma.masked_invalid(grid[t])
        im = ax.imshow(masked, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_facecolor("#eeeeee")
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        step = max(1, len(cols) // 40)
        ax.set_xticks(range(0, len(cols), step), cols[::step], fontsize=7, rotation=90 if len(cols) > 12 else 0)
        ax.set_title(f"α of {names[t] if t < len(names) else t}", fontsize=9)
        if grid[t].size <= 120:
            for r in range(len(rows)):
                for c in range(len(cols)):
                    if np.isfinite(grid[t, r, c]):
                        v = grid[t, r, c]  # dark text on the light end of the scale
                        x = float(norm(v))
                        light = abs(x - 0.5) < 0.3 if cmap == "RdBu_r" else x > 0.6
                        ink = "black" if light else "white"
                        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color=ink)
    axes[-1].set_xlabel("layer (outer modules at the ends)")
    fig.colorbar(im, ax=axes.tolist(), shrink=0.9, label="α")
    fig.suptitle(f"Merge weights per module (granularity {report.get('granularity', '?')})", fontsize=10)
    return fig


def run_report(merged: str | Path, out: str | Path | None = None) -> Path:
    """`slta report MERGED [-o PNG_OR_DIR]`: Figure 5 from the merge folder's slta_report.json.

    Written to `out` (a .png file, or a folder that gets fig5_alpha.png), by default into the current
    directory: never into the model folder, which holds only what `slta merge` wrote."""
    merged = Path(merged)
    src = merged / "slta_report.json" if merged.is_dir() else merged
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist (written by `slta merge` into its output folder)")
    try:
        report = json.loads(src.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{src}: not valid JSON ({e})") from e
    target = Path(out) if out else Path.cwd()
    if target.suffix.lower() != ".png":
        target = target / "fig5_alpha.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp.png")
    try:
        fig5_alpha(report, tmp)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="draw Figure 5 (every module's α as a heatmap) from a merge folder")
    p.add_argument("merged", help="a merge output folder (or its slta_report.json)")
    p.add_argument("-o", "--output", help="PNG file, or folder for fig5_alpha.png (default: the current directory)")
    p.set_defaults(func=_cli)


def _cli(a: argparse.Namespace) -> None:
    print(f"figure written to {run_report(a.merged, a.output)}")
