"""The loss picture, like the book's `plot_losses`: train and validation loss against epochs, with
tokens seen on a second x axis. matplotlib is an optional extra (`pip install minisft[plot]`)."""
from .files import atomic_path


def plot_losses(evals: list, num_epochs: float, path) -> str | None:
    """evals: the run's eval records ({"train_loss", "val_loss", "tokens_seen"} in order).
    Writes a PNG to path and returns None, or returns a one-line note when matplotlib is missing."""
    try:  # imported here: matplotlib is an optional extra, and slow to import
        import matplotlib
        matplotlib.use("Agg")  # files only, no screen
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return "loss plot skipped: matplotlib is not installed (pip install 'minisft[plot]')"
    n = len(evals)
    epochs_seen = [num_epochs * i / max(n - 1, 1) for i in range(n)]  # as the book: evenly spread
    train = [e["train_loss"] for e in evals]
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train, label="Training loss")
    ax1.plot(epochs_seen, [e["val_loss"] for e in evals], linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # the same curve against tokens seen, drawn invisibly to set the top axis
    ax2.plot([e["tokens_seen"] for e in evals], train, alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return None
