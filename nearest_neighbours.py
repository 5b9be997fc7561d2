"""Nearest neighbours among patches: chunked exact distances, the greedy coreset that chooses
PatchCore's memory bank, and the inverted-file index that searches it.

Shapes: queries (M, D) and banks (B, D) float32; distances are Euclidean unless a name says squared.
"""
import numpy as np

CORESET_CHUNK_PATCHES = 25088  # PatchCore's greedy coreset runs per chunk of this many patches (32 lite0 images)
IVF_PROBES = 8  # inverted lists searched per query by PatchCore's index


def squared_distances(a, b):
    """(M, D), (B, D) -> (M, B) squared Euclidean distances, as |a|^2 - 2 a.b + |b|^2: one matrix
    product (rounding can make a few slightly negative; callers clip before a square root)."""
    return np.einsum('ij,ij->i', a, a)[:, None] - 2 * (a @ b.T) + np.einsum('ij,ij->i', b, b)[None]


def nearest_squared_distances(queries, bank, chunk=2048):
    """Squared Euclidean distance from each query row to its nearest bank row, and that row's index.

    queries (M, D), bank (B, D) float32 -> ((M,) float32 clipped at 0, (M,) int). Chunked matrix
    products keep memory at chunk x B and in cache: 3x faster than one (M, B) product on 25k x 2.5k
    (the coreset's chunks); measured 4.5 s against 5.3 s for scikit-learn's brute-force kNN on
    PatchCore's bottle bank (16k x 152), so no library is used here.
    """
    squared_min, indices = np.empty(len(queries), np.float32), np.empty(len(queries), np.int64)
    for start in range(0, len(queries), chunk):
        q = queries[start:start + chunk]
        squared = squared_distances(q, bank)
        best = squared.argmin(axis=1)
        indices[start:start + chunk] = best
        squared_min[start:start + chunk] = np.maximum(squared[np.arange(len(q)), best], 0)
    return squared_min, indices


def nearest_distances(queries, bank, chunk=2048):
    """nearest_squared_distances as distances: ((M,) float32, (M,) int)."""
    squared, indices = nearest_squared_distances(queries, bank, chunk)
    return np.sqrt(squared), indices


def random_projection(dims, projection_dims, rng):
    """(dims, projection_dims) float32 seeded Gaussian projection (Johnson-Lindenstrauss), or None
    where the points have no more dimensions than that. float32: a float64 projection would double
    the cost of every greedy step."""
    if dims <= projection_dims:
        return None
    return (rng.standard_normal((dims, projection_dims)) / np.sqrt(projection_dims)).astype(np.float32)


def farthest_first(points, count, first, min_squared=None):
    """Indices of `count` rows of points (M, d) float32, each the farthest from those before it
    (greedy k-centre), starting from row `first`, or, given min_squared (M,) (squared distances to
    points chosen earlier), from the farthest of those. One matrix-vector product per step."""
    squared_norms = np.einsum('ij,ij->i', points, points)
    chosen = np.empty(count, np.int64)
    if min_squared is None:
        chosen[0], min_squared = first, np.full(len(points), np.inf, np.float32)
    else:
        min_squared = min_squared.astype(np.float32)
        chosen[0] = int(min_squared.argmax())
    for i in range(1, count + 1):
        centre = points[chosen[i - 1]]
        np.minimum(min_squared, squared_norms - 2 * (points @ centre) + centre @ centre, out=min_squared)
        if i < count:
            chosen[i] = int(min_squared.argmax())
    return chosen


def greedy_coreset(points, count, projection_dims=128, seed=0):
    """Indices of `count` rows of `points` (M, D) chosen by greedy k-centre selection (PatchCore).

    Each step takes the point farthest from those chosen, so every point ends up close to a chosen
    one. Distances are measured after a seeded Gaussian random projection to projection_dims, as in
    the paper. Costs M x count steps: the exact reference that chunked_coreset is measured against.
    """
    rng = np.random.default_rng(seed)
    projection = random_projection(points.shape[1], projection_dims, rng)
    return farthest_first(points if projection is None else points @ projection, count, rng.integers(len(points)))


def coreset_chunk_share(ratio, patches_per_row, chunk_patches=CORESET_CHUNK_PATCHES):
    """How many patches chunked_coreset chooses from a full chunk: what a next chunk starts from."""
    return max(1, int(round(ratio * max(1, chunk_patches // patches_per_row) * patches_per_row)))


def chunked_coreset(patches, ratio, chunk_patches=CORESET_CHUNK_PATCHES, projection_dims=128, seed=0, start=None):
    """Flat indices into patches.reshape(-1, D) of about ratio x N x P patches: greedy k-centre over
    chunks of consecutive rows (images), each chunk starting from what the previous chunk chose, merged.

    patches (N, P, D) float32. The exact greedy costs (patches x bank), quadratic in the training set;
    chunks of at most `chunk_patches` patches make it linear, and starting from the previous chunk's
    choice spends a chunk's share of the bank on what that choice does not already cover (measured in
    benchmarks/patchcore_scale.py --coverage). start: (S, D) patches chosen before (by an earlier call
    on other rows, unprojected) that the first chunk continues from, as from a previous chunk's choice.
    """
    n, p, d = patches.shape
    rng = np.random.default_rng(seed)
    projection = random_projection(d, projection_dims, rng)
    rows_per_chunk = max(1, chunk_patches // p)
    # previous: the projected points the previous chunk chose
    previous = None if start is None else start if projection is None else start @ projection
    chosen = []
    for start in range(0, n, rows_per_chunk):
        chunk_rows = np.arange(start, min(n, start + rows_per_chunk))
        points = patches[chunk_rows].reshape(-1, d)
        points = points if projection is None else points @ projection
        covered = None if previous is None else nearest_squared_distances(points, previous)[0]
        count = max(1, int(round(ratio * len(points))))
        picked = farthest_first(points, count, 0, covered)
        previous = points[picked]
        chosen.append(chunk_rows[picked // p] * p + picked % p)
    return np.concatenate(chosen)


def _faiss():
    """faiss, imported on first use (only PatchCore pays its start-up time), on one thread: its work
    stays on the caller's thread like all scoring arithmetic, and k-means gives the same centres
    whatever the number of cores."""
    import faiss
    faiss.omp_set_num_threads(1)
    return faiss


def ivf_list_count(rows):
    """Inverted lists for a bank of `rows` rows: about 2 sqrt(rows), at least 39 rows each."""
    return int(min(2 * np.sqrt(rows), rows / 39))


def ivf_centroids(bank, seed=0):
    """(L, D) float32 centres of the inverted lists of a bank (B, D): seeded k-means (faiss), about
    2 sqrt(B) lists of at least 39 rows (faiss's minimum per centre); (0, D) where the bank is too
    small for lists to pay (exact search)."""
    lists = ivf_list_count(len(bank))
    if lists < 2 * IVF_PROBES:
        return np.zeros((0, bank.shape[1]), np.float32)
    kmeans = _faiss().Kmeans(bank.shape[1], lists, niter=10, seed=seed, max_points_per_centroid=64)
    kmeans.train(np.ascontiguousarray(bank, np.float32))
    return kmeans.centroids


class NearestPatchIndex:
    """The nearest row of a bank (B, D) float32 to each query: faiss's inverted-file index (IVF-Flat).

    Chosen by measurement on PatchCore's bottle banks (15k and 59k rows, lite0, one thread, held-out
    images; docs/speed.md, "PatchCore at scale"): searching IVF_PROBES of about 2 sqrt(B) lists found the
    exact nearest patch for all but < 1 in 10,000 queries, 7-15x faster than brute force, and built
    in 0.4 s / 3 s; HNSW graphs (faiss, hnswlib) and usearch were 2x slower per query at equal or
    lower recall, took 2-3 s / 17-22 s to build, and would have to be stored as library blobs.
    Here the index is rebuilt from two plain arrays, the bank and `centroids` (L, D) float32 (see
    ivf_centroids), by assigning each bank row to its nearest centre: loading a feature file never
    parses a library's serialized format. With no centroids, or exact=True, search is brute force.
    """

    def __init__(self, bank, centroids, probes=IVF_PROBES):
        self.bank, self.centroids, self.probes = bank, centroids, probes
        self.index = None
        if len(centroids):
            faiss = _faiss()
            quantizer = faiss.IndexFlatL2(bank.shape[1])
            quantizer.add(np.ascontiguousarray(centroids, np.float32))
            self.index = faiss.IndexIVFFlat(quantizer, bank.shape[1], len(centroids))
            self.index.add(np.ascontiguousarray(bank, np.float32))
            self.index.nprobe = probes

    def row_lists(self):
        """(B,) int64: the inverted list each bank row was filed in, read back from the index
        (so that an export probes exactly the rows this index searches); None without lists."""
        if self.index is None:
            return None
        faiss, lists = _faiss(), self.index.invlists
        labels = np.empty(len(self.bank), np.int64)
        for l in range(lists.nlist):
            if lists.list_size(l):
                labels[faiss.rev_swig_ptr(lists.get_ids(l), lists.list_size(l))] = l
        return labels

    def search(self, queries, exact=False, excluded=None):
        """queries (M, D) float32 -> (distances (M,) float32, indices (M,) int64) of the nearest bank row.
        excluded: bank row indices left out of the search (an image's own patches, for its held-out score)."""
        if self.index is None or exact:
            return self._exact(queries, excluded)
        params = None
        if excluded is not None and len(excluded):
            faiss = _faiss()
            params = faiss.SearchParametersIVF(nprobe=self.probes, sel=faiss.IDSelectorNot(
                faiss.IDSelectorBatch(np.ascontiguousarray(excluded, np.int64))))
        squared, indices = self.index.search(np.ascontiguousarray(queries, np.float32), 1, params=params)
        distances, indices = np.sqrt(np.maximum(squared[:, 0], 0)), indices[:, 0]
        unfound = np.flatnonzero(indices < 0)  # every probed list empty: never seen, but never wrong
        if len(unfound):
            distances[unfound], indices[unfound] = self._exact(queries[unfound], excluded)
        return distances, indices

    def _exact(self, queries, excluded=None):
        """Brute force over the bank without the `excluded` rows (indices into the whole bank)."""
        if excluded is None or not len(excluded):
            return nearest_distances(queries, self.bank)
        rows = np.setdiff1d(np.arange(len(self.bank)), excluded)
        distances, indices = nearest_distances(queries, self.bank[rows])
        return distances, rows[indices]

