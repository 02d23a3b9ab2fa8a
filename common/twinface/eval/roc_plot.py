"""ROC curves of verification results: a PNG for reports, a matplotlib Figure for TensorBoard's add_figure."""
from pathlib import Path


def roc_figure(results: dict, title: str | None = None):
    """One ROC curve (mean over folds) per named VerificationResult, FAR on a log axis; returns the Figure."""
    if not results:
        raise ValueError("results: expected at least one {name: VerificationResult}, got none")
    # Figure + Agg canvas instead of pyplot: headless, and no global backend switch in the caller's process
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, result in results.items():
        label = f"{name}  acc {result.acc_mean:.5f}+-{result.acc_std:.5f}"
        axes.plot(result.fpr, result.tpr, label=label)  # log scale drops the FAR=0 points
    axes.set_xscale("log")
    axes.set_xlabel("false accept rate (FAR)")
    axes.set_ylabel("true accept rate (TAR)")
    axes.set_ylim(0, 1.01)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title(title or "ROC, mean over folds")
    figure.tight_layout()
    return figure


def save_roc_plot(results: dict, path_png, title: str | None = None) -> Path:
    """Write roc_figure(results, title) as a PNG to path_png; returns the path."""
    path_png = Path(path_png)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    roc_figure(results, title).savefig(path_png, format="png")
    return path_png
