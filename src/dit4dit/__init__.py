"""dit4dit: a Video-Action Model — a video DiT's hidden states at a fixed flow time condition an
action DiT that generates robot action chunks by flow matching; both are trained jointly."""

__version__ = "0.1.0"


def _no_progress_monitor_thread() -> None:
    """Turn off tqdm's monitor thread, which wakes every 10 s to refresh open bars. Our bars are
    driven by the work itself and do not need it, and data-loader workers fork most safely from a
    process without background threads."""
    try:
        import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return
    tqdm.tqdm.monitor_interval = 0


_no_progress_monitor_thread()
