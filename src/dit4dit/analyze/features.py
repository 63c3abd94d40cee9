"""Feature analysis (the paper's Figure 8c): are the action DiT's conditioning features ordered by
the phase of the episode?

For dataset frames spread over all episodes, the features the policy would see are extracted
(`DiT4DiT.extract_features`: the inference path, one future noise draw at `tau_f`; the image
encoder's features for the static baseline), mean-pooled over tokens, and labelled by episode
phase: the early, middle or late third of the episode. Reported: the silhouette score of the
phase labels (Rousseeuw 1987; Euclidean distances) on the pooled features, its mean within each
task, and on a 2-D t-SNE embedding, which is also plotted.

No scikit-learn: the silhouette score and an exact t-SNE (van der Maaten & Hinton 2008, with
PCA initialisation, early exaggeration, momentum and gains as in common implementations) are
written here in numpy; fine for the few thousand points used.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

PHASES = ("early", "middle", "late")


# --------------------------------------------------------------------------------------------
# silhouette
# --------------------------------------------------------------------------------------------


def pairwise_distances(x: np.ndarray) -> np.ndarray:
    """Euclidean distances (N, N) between the rows of ``x``."""
    x = np.asarray(x, dtype=np.float64)
    sq = (x * x).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * x @ x.T
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, 0.0)
    return np.sqrt(d2)


def silhouette_samples(x: np.ndarray, labels: Sequence[Any]) -> np.ndarray:
    """Per-point silhouette ``s(i) = (b(i) - a(i)) / max(a(i), b(i))``: ``a`` the mean distance to
    the other points of its cluster, ``b`` the smallest mean distance to another cluster; 0 for
    a point alone in its cluster. Needs 2 <= clusters < points."""
    labels = np.asarray(labels)
    n = len(labels)
    if len(x) != n:
        raise ValueError(f"silhouette: {len(x)} points but {n} labels")
    names, idx = np.unique(labels, return_inverse=True)
    k = len(names)
    if not 2 <= k < n:
        raise ValueError(f"silhouette needs 2 <= number of clusters < number of points, got {k} clusters for "
                         f"{n} points")
    d = pairwise_distances(x)
    onehot = np.zeros((n, k))
    onehot[np.arange(n), idx] = 1.0
    sums = d @ onehot  # (N, k): summed distance from each point to each cluster
    sizes = onehot.sum(0)
    own = sizes[idx]
    a = sums[np.arange(n), idx] / np.maximum(own - 1, 1)
    mean_other = sums / sizes[None, :]
    mean_other[np.arange(n), idx] = np.inf
    b = mean_other.min(1)
    denom = np.maximum(a, b)
    s = np.where(denom > 0, (b - a) / np.where(denom > 0, denom, 1.0), 0.0)
    return np.where(own > 1, s, 0.0)


def silhouette_score(x: np.ndarray, labels: Sequence[Any]) -> float:
    """Mean silhouette over all points (as ``sklearn.metrics.silhouette_score``, Euclidean)."""
    return float(silhouette_samples(x, labels).mean())


# --------------------------------------------------------------------------------------------
# t-SNE
# --------------------------------------------------------------------------------------------


def _pca(x: np.ndarray, dims: int) -> np.ndarray:
    x = x - x.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    dims = min(dims, u.shape[1])
    return u[:, :dims] * s[:dims]


def _affinities(d2: np.ndarray, perplexity: float, tol: float = 1e-5, max_iter: int = 100) -> np.ndarray:
    """Row-wise Gaussian affinities whose entropy matches log(perplexity) (binary search on beta)."""
    n = d2.shape[0]
    target = np.log(perplexity)
    p = np.zeros((n, n))
    for i in range(n):
        di = np.delete(d2[i], i)
        lo, hi, beta = 0.0, np.inf, 1.0
        for _ in range(max_iter):
            w = np.exp(-(di - di.min()) * beta)
            sw = w.sum()
            h = np.log(sw) + beta * ((di - di.min()) * w).sum() / sw
            if abs(h - target) < tol:
                break
            if h > target:
                lo = beta
                beta = beta * 2 if hi == np.inf else (beta + hi) / 2
            else:
                hi = beta
                beta = (beta + lo) / 2
        p[i, np.arange(n) != i] = w / sw
    return p


def tsne(x: np.ndarray, dims: int = 2, perplexity: float = 30.0, iterations: int = 750, seed: int = 0,
         pca_dims: int = 50) -> np.ndarray:
    """Exact t-SNE of the rows of ``x`` into ``dims`` dimensions (deterministic for a seed)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 points, got {n}")
    perplexity = float(min(perplexity, (n - 1) / 3))
    x = _pca(x, pca_dims)
    x = x / (np.abs(x).max() or 1.0)
    d2 = pairwise_distances(x) ** 2
    p = _affinities(d2, perplexity)
    p = (p + p.T) / (2.0 * n)
    p = np.maximum(p, 1e-12)
    # PCA initialisation scaled to a small spread; a tiny seeded jitter breaks exact ties.
    rng = np.random.default_rng(seed)
    y = _pca(x, dims)
    y = y / (y[:, 0].std() or 1.0) * 1e-4 + rng.normal(0, 1e-8, size=y.shape)
    exaggeration, lr = 12.0, max(n / 12.0 / 4.0, 50.0)
    update = np.zeros_like(y)
    gains = np.ones_like(y)
    for it in range(iterations):
        early = it < 250
        sq = (y * y).sum(1)
        num = 1.0 / (1.0 + np.maximum(sq[:, None] + sq[None, :] - 2.0 * y @ y.T, 0.0))
        np.fill_diagonal(num, 0.0)
        q = np.maximum(num / num.sum(), 1e-12)
        pq = ((exaggeration if early else 1.0) * p - q) * num
        grad = 4.0 * (pq.sum(1)[:, None] * y - pq @ y)
        momentum = 0.5 if early else 0.8
        same = np.sign(grad) == np.sign(update)
        gains = np.where(same, gains * 0.8, gains + 0.2).clip(min=0.01)
        update = momentum * update - lr * gains * grad
        y = y + update
        y = y - y.mean(0)
    return y


# --------------------------------------------------------------------------------------------
# features of a trained model
# --------------------------------------------------------------------------------------------


def phase_of(frame: int, length: int) -> int:
    """0, 1, 2 = early, middle, late third of an episode of ``length`` frames."""
    return min(2, int(3 * frame / max(1, length)))


def extract_phase_features(model: Any, processor: Any, dataset: str, num_points: int = 512, batch_size: int = 32,
                           seed: int = 0) -> dict[str, np.ndarray]:
    """Pooled features of ``num_points`` dataset frames spread evenly over the dataset (all its
    episodes), with their phase, task and episode. Returns arrays ``features`` (N, width),
    ``phase`` (N,) int, ``task`` (N,) str, ``episode`` (N,) int, ``frame`` (N,) int."""
    import torch

    from ..data.lerobot import LeRobotDataset
    from ..data.samples import TrainingSamples, collate

    ds = LeRobotDataset(dataset)
    try:
        samples = TrainingSamples(ds, processor=processor, action_horizon=model.cfg.action.action_horizon)
        lengths = {e.index: e.length for e in samples.episodes}
        n = min(int(num_points), len(samples))
        picks = np.unique(np.linspace(0, len(samples) - 1, n).round().astype(int))
        nc = model.cfg.inputs.num_cond_frames
        generator = torch.Generator(device=model.device).manual_seed(seed)
        feats, phase, task, episode, frame = [], [], [], [], []
        model.eval()
        with torch.no_grad():
            for start in range(0, len(picks), batch_size):
                batch = collate(samples.__getitems__([int(i) for i in picks[start:start + batch_size]]))
                text = model.encode_text(list(batch["instruction"])).to(model.video_dtype)
                f = model.extract_features(batch["video"][:, :, :nc].to(model.device), text, generator)
                feats.append(f.float().mean(dim=1).cpu().numpy())
                for e, t, ins in zip(batch["episode_index"].tolist(), batch["frame_index"].tolist(),
                                     batch["instruction"]):
                    phase.append(phase_of(t, lengths[e]))
                    task.append(ins)
                    episode.append(e)
                    frame.append(t)
    finally:
        ds.close()
    return {"features": np.concatenate(feats), "phase": np.asarray(phase), "task": np.asarray(task),
            "episode": np.asarray(episode), "frame": np.asarray(frame)}


def phase_analysis(data: dict[str, np.ndarray], seed: int = 0, tsne_iterations: int = 750) -> dict[str, Any]:
    """Silhouette scores of the phase labels and a 2-D t-SNE embedding (JSON-ready)."""
    x, phase, task = data["features"], data["phase"], data["task"]
    out: dict[str, Any] = {"points": int(len(x)),
                           "phase_counts": {PHASES[p]: int((phase == p).sum()) for p in range(3)}}
    out["silhouette_phase"] = _safe_silhouette(x, phase)
    within = [s for t in np.unique(task) if (s := _safe_silhouette(x[task == t], phase[task == t])) is not None]
    out["silhouette_phase_within_task"] = float(np.mean(within)) if within else None
    out["silhouette_task"] = _safe_silhouette(x, task)
    y = tsne(x, seed=seed, iterations=tsne_iterations) if len(x) >= 3 else np.zeros((len(x), 2))
    out["silhouette_phase_tsne"] = _safe_silhouette(y, phase)
    out["tsne"] = {"x": y[:, 0].round(4).tolist(), "y": y[:, 1].round(4).tolist(), "phase": phase.tolist(),
                   "task": task.tolist()}
    return out


def _safe_silhouette(x: np.ndarray, labels: np.ndarray) -> float | None:
    k = len(np.unique(labels))
    return silhouette_score(x, labels) if 2 <= k < len(labels) else None
