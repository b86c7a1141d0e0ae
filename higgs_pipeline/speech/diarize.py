"""Who speaks when: speaker embeddings of short windows (the scorer's speaker model: Resemblyzer embedded, a
WavLM x-vector checkpoint by name or folder) clustered per recording; `ingest/registry.py` matches the clusters
across recordings so that one person keeps one label.

Clustering is spectral, as in pyannote and NeMo (NME-SC, Park et al. 2019): the windows' cosine affinity, each row
pruned to its p nearest windows and symmetrised, the normalised Laplacian's first eigenvectors as the windows'
coordinates, then k-means (fixed seed: the same labels every run). Without a known count the count is where the
Laplacian's eigenvalues jump most (the eigengap) among the first `max_speakers`, with p chosen where that jump is
clearest; a recording whose windows all lie close to their mean is one speaker (the eigengap cannot say "one").
One distance threshold does not carry from one recording to the next: the eigengap reads each recording's own scale.
A long recording's windows are subsampled for the graph (its memory is quadratic) and every window then joins its
nearest centroid, so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from higgs_pipeline.speech.scoring import EMBEDDED_SPEAKER, load_speaker_batch


@dataclass(frozen=True)
class DiarizeSettings:
    window_s: float = 1.5  # long enough for a stable embedding, short enough to land inside one turn
    hop_s: float = 0.75
    min_window_s: float = 0.5  # a shorter speech region is not embedded (its words take the nearest window's label)
    max_tree_points: int = 2000  # windows beyond this are subsampled for the graph, then assigned to centroids
    min_speaker_s: float = 2.0  # with a known count, each speaker must hold this much speech (else too many asked)
    max_speakers: int = 8  # the most speakers the eigengap may find in one recording
    # Mean cosine distance of the windows to their mean below which a recording is one voice (Resemblyzer's scale:
    # one espeak-ng voice 0.10, a real call's two women 0.14-0.15, two to six espeak-ng voices 0.17-0.21).
    one_speaker_spread: float = 0.12
    min_neighbours: int = 6  # pruning keeps at least this many (a window's time neighbours are near copies of it)


class TooManySpeakersError(ValueError):
    """The recording's speech cannot be split into the requested number of speakers."""


def speech_windows(regions: Sequence[tuple[float, float]], settings: DiarizeSettings) -> list[tuple[float, float]]:
    """Windows of `window_s` every `hop_s` inside each speech region (a short region is one window)."""
    windows = []
    for start, end in regions:
        length = end - start
        if length < settings.min_window_s:
            continue
        if length <= settings.window_s:
            windows.append((start, end))
            continue
        count = int(np.floor((length - settings.window_s) / settings.hop_s)) + 1
        windows += [(start + k * settings.hop_s, start + k * settings.hop_s + settings.window_s) for k in range(count)]
        if windows[-1][1] < end - 1e-6:  # the region's tail gets a window of its own
            windows.append((end - settings.window_s, end))
    return windows


def batch_embedder(
    speaker_model: str = EMBEDDED_SPEAKER, device: str = "cpu"
) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    """(clips, dim) unit-norm speaker embeddings of many 16 kHz clips, each what a batch of that clip alone gives,
    the clips run through the speaker model together."""
    model = load_speaker_batch(speaker_model, device)

    def embed(clips: Sequence[np.ndarray]) -> np.ndarray:
        vectors = model([np.ascontiguousarray(clip, dtype=np.float32) for clip in clips])
        if not vectors:
            return np.zeros((0, 0), dtype=np.float32)
        stacked = np.stack([np.asarray(vector, dtype=np.float32).ravel() for vector in vectors])
        norms = np.linalg.norm(stacked, axis=1, keepdims=True)
        return stacked / np.where(norms > 0, norms, 1.0)

    return embed


def cluster(
    embeddings: np.ndarray, durations: np.ndarray, settings: DiarizeSettings, num_speakers: int | None = None
) -> np.ndarray:
    """A label 0..k-1 per window, numbered in order of first appearance; exactly `num_speakers` labels when given."""
    count = len(embeddings)
    if num_speakers is not None and (num_speakers < 1 or count < num_speakers):
        raise TooManySpeakersError(f"{num_speakers} speakers asked, but only {count} speech windows to tell apart")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if num_speakers is None and (count <= 2 or _spread(embeddings) < settings.one_speaker_spread):
        return np.zeros(count, dtype=np.int64)
    if num_speakers == 1:
        return np.zeros(count, dtype=np.int64)
    rng = np.random.default_rng(0)
    graph_index = (
        np.sort(rng.choice(count, settings.max_tree_points, replace=False))
        if count > settings.max_tree_points
        else np.arange(count)
    )
    graph_labels = spectral_labels(embeddings[graph_index], settings, num_speakers)
    labels = _assign_to_centroids(embeddings, centroids(embeddings[graph_index], graph_labels))
    labels = _first_appearance_order(labels)
    if num_speakers is not None:
        seconds = np.bincount(labels, weights=durations, minlength=num_speakers)
        if len(np.unique(labels)) < num_speakers or seconds.min() < settings.min_speaker_s:
            enough = int((seconds >= settings.min_speaker_s).sum())
            spread = ", ".join(f"{value:.1f}" for value in seconds)
            raise TooManySpeakersError(
                f"{num_speakers} speakers asked, but the speech splits into only {enough} with "
                f"{settings.min_speaker_s:g} s or more each (seconds per speaker: {spread})"
            )
    return labels


def spectral_labels(embeddings: np.ndarray, settings: DiarizeSettings, num_speakers: int | None) -> np.ndarray:
    """Spectral clustering of unit-norm embeddings into `num_speakers` clusters, or into as many as the eigengap says.

    Each pruning level p (neighbours kept per row) gives a graph; the one kept is where the largest eigengap, relative
    to the eigenvalue range, is biggest for the fewest neighbours (NME-SC's p/gap ratio): too few neighbours cut one
    voice into pieces, too many join voices.
    """
    from sklearn.cluster import KMeans

    count = len(embeddings)
    similarity = np.clip(embeddings.astype(np.float64) @ embeddings.T.astype(np.float64), 0.0, 1.0)
    top = min(settings.max_speakers, count - 1)
    lowest = min(count, max(_neighbour_floor(count, settings), int(np.ceil(0.1 * count))))
    highest = max(lowest, int(np.ceil(0.5 * count)))
    best = None
    for neighbours in np.unique(np.linspace(lowest, highest, 10).round().astype(int)):
        values, vectors = _laplacian_eigen(_pruned(similarity, int(neighbours)), top)
        gaps = np.diff(values)
        ratio = (neighbours / count) / max(float(gaps.max()) / max(float(values[-1]), 1e-9), 1e-9)
        if best is None or ratio < best[0]:
            best = (ratio, gaps, vectors)
    _ratio, gaps, vectors = best
    speakers = num_speakers or int(np.argmax(gaps)) + 1
    if speakers == 1:
        return np.zeros(count, dtype=np.int64)
    points = vectors[:, :speakers]
    points = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
    return KMeans(speakers, n_init=10, random_state=0).fit_predict(points).astype(np.int64)


def _neighbour_floor(count: int, settings: DiarizeSettings) -> int:
    """The fewest neighbours a row keeps: `min_neighbours`, but at most half the windows (and at least 3, itself and
    its two time neighbours) so that a short recording's graph is not complete: 6 neighbours of a 2-voice recording's
    6 windows join both voices into one (measured on 2-3 s turns, docs/benchmarks.md). From 12 windows on it is
    `min_neighbours` itself."""
    return min(settings.min_neighbours, max(3, count // 2))


def _pruned(similarity: np.ndarray, neighbours: int) -> np.ndarray:
    """Each row keeps its `neighbours` largest affinities (zero elsewhere), then the graph is made symmetric."""
    kept = np.argsort(-similarity, axis=1)[:, :neighbours]
    mask = np.zeros(similarity.shape, dtype=bool)
    np.put_along_axis(mask, kept, True, axis=1)
    pruned = np.where(mask, similarity, 0.0)
    return (pruned + pruned.T) / 2


def _laplacian_eigen(affinity: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The `top + 1` smallest eigenvalues (ascending) and their eigenvectors of the symmetric normalised Laplacian."""
    from scipy.linalg import eigh

    scale = 1.0 / np.sqrt(np.maximum(affinity.sum(axis=1), 1e-12))
    laplacian = np.eye(len(affinity)) - scale[:, None] * affinity * scale[None, :]
    return eigh(laplacian, subset_by_index=[0, top])


def _spread(embeddings: np.ndarray) -> float:
    """Mean cosine distance of unit-norm embeddings to their mean direction."""
    mean = embeddings.mean(axis=0)
    mean = mean / max(float(np.linalg.norm(mean)), 1e-12)
    return float(np.mean(1.0 - embeddings @ mean))


def centroids(embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Unit-norm mean embedding per label 0..max(labels)."""
    rows = []
    for label in range(int(labels.max()) + 1 if len(labels) else 0):
        mean = embeddings[labels == label].mean(axis=0)
        rows.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
    return np.asarray(rows, dtype=np.float32)


def _assign_to_centroids(embeddings: np.ndarray, centers: np.ndarray) -> np.ndarray:
    return np.argmax(embeddings @ centers.T, axis=1).astype(np.int64)


def _first_appearance_order(labels: np.ndarray) -> np.ndarray:
    order = {label: index for index, label in enumerate(dict.fromkeys(labels.tolist()))}
    return np.asarray([order[label] for label in labels.tolist()], dtype=np.int64)
