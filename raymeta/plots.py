"""Figures of a run: accuracy per model and setting, and the meta-training curves."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from raymeta.evaluate import SETTINGS


def model_colours(results: dict, histories: dict) -> dict[str, str]:
    """One colour-cycle entry per model (BM, LG, LC, ...), the same in both panels."""
    names = list(dict.fromkeys([*results, *histories]))
    return {name: f"C{i}" for i, name in enumerate(names)}


def draw_results(results: dict, histories: dict, ended: Mapping[str, str] | None = None):
    """The results figure: left, accuracy of each model (BM, LG, LC) per setting (solid), with
    the leak of the control settings (answers that are the partner's response) hatched on top
    of it, so a leak shows whatever its size; right, outer loss against step for each objective
    (left out when nothing was meta-trained). ``ended`` maps an objective that ended early to
    how: "diverged" (labelled with the step that diverged; its history ends before it) or
    "stopped" (by a signal; labelled with the last step its history holds). Each model keeps
    its colour in both panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = model_colours(results, histories)
    models = list(results)
    present = {s for r in results.values() for s in r}
    settings = [s for s in SETTINGS if s in present]  # the table's order
    if histories:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    else:  # an evaluation-only job: no meta-training to draw
        fig, ax = plt.subplots(1, 1, figsize=(6.5, 4.2))
        bx = None
    width = 0.8 / max(1, len(models))
    for i, name in enumerate(models):
        xs = [k + i * width for k in range(len(settings))]
        acc = [results[name].get(s, {}).get("accuracy", 0.0) for s in settings]
        leak = [results[name].get(s, {}).get("leak", 0.0) for s in settings]
        ax.bar(xs, acc, width, label=name, color=colours[name])
        ax.bar(xs, leak, width, bottom=acc, fill=False, hatch="//", edgecolor=colours[name])
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(settings))], settings)
    ax.set_ylim(0, 1.05)  # a bar at 1 keeps its top edge
    ax.set_ylabel("accuracy (solid) + leak (hatched)")
    from matplotlib.patches import Patch

    handles, _ = ax.get_legend_handles_labels()
    if any("leak" in results[name].get(s, {}) for name in models for s in settings):
        handles.append(Patch(fill=False, hatch="//", label="leak: the partner's answer"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(handles))
    ax.set_title("evaluation")
    if bx is None:
        fig.tight_layout()
        return fig
    for objective, hist in histories.items():
        steps = [h["step"] for h in hist if "outer_loss" in h]
        losses = [h["outer_loss"] for h in hist if "outer_loss" in h]
        label = objective
        how = (ended or {}).get(objective)
        if how == "diverged":  # (its history holds every step before the one that diverged)
            label += f" (diverged at step {steps[-1] + 1 if steps else 1})"
        elif how == "stopped":  # (by a signal: its history, the steps recorded by then)
            label += f" (stopped after step {steps[-1]})" if steps else " (stopped, no step)"
        elif not steps:
            continue
        marker = "o" if len(steps) == 1 else None  # a single step still shows
        bx.plot(steps, losses, label=label, color=colours[objective], marker=marker)
    from matplotlib.ticker import MaxNLocator

    bx.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
    lo, hi = bx.get_xlim()
    if hi - lo < 2:  # a single step: room for whole-step ticks either side
        bx.set_xlim(max(lo - 1, 0), hi + 1)
    bx.set_xlabel("outer step")
    bx.set_ylabel("outer loss (LG: answer NLL, LC: KL to the teacher)")
    if any(len(line.get_xdata()) for line in bx.get_lines()):
        bx.set_yscale("log")
    else:  # every objective ended at its first step: no loss to scale
        bx.set_yticks([])
    bx.legend()
    bx.set_title("meta-training")
    fig.tight_layout()
    return fig


def plot_results(
    results: dict, histories: dict, path: str | Path, ended: Mapping[str, str] | None = None
) -> Path:
    """Write :func:`draw_results`'s figure as a PNG at ``path``."""
    fig = draw_results(results, histories, ended)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
