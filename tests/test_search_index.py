"""search's index for large galleries: exact below SEARCH_EXACT_UP_TO, IVF-PQ with exact
re-ranking above it, kept up to date with the gallery and never left half-written."""
import gc
import weakref
from pathlib import Path

import numpy as np
import pytest

from reidkit.data import checks
from reidkit.evaluate.metrics import NonFiniteError
from reidkit.search import cache as gallery_cache
from reidkit.search import command as searching
from reidkit.search import index as search_index


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """FAISS's k-means waits at a barrier per step: on a busy 2-core machine one thread is
    twice as fast as two. Only for these tests; search uses FAISS's default."""
    import faiss
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def _clustered(rows: int, dim: int, seed: int = 0, per_id: int = 20):
    """Features with identity structure: id centres plus noise; also one query per 10 ids."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((rows // per_id + 1, dim), dtype=np.float32)
    labels = np.arange(rows) // per_id
    features = centres[labels] + 0.5 * rng.standard_normal((rows, dim), dtype=np.float32)
    queries = centres[::10] + 0.5 * rng.standard_normal((len(centres[::10]), dim),
                                                        dtype=np.float32)
    return features, queries


def _on_disk(folder: Path, features: np.ndarray, name: str = 'features.npy') -> np.ndarray:
    """`features` as search keeps them: a memory-mapped .npy."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / name, features)
    return np.load(folder / name, mmap_mode='r')


def _gallery(features: np.ndarray, ids=None) -> gallery_cache.Gallery:
    ids = np.arange(len(features)) if ids is None else np.asarray(ids)
    return gallery_cache.Gallery([f'/g/{i}.jpg' for i in ids], [], features, cached=True,
                                 ids=ids, files=gallery_cache.CacheFiles(Path('/g'), 'key'),
                                 inodes=np.zeros(len(ids), np.uint64))


def _exact_top(queries, features, rows):
    return [(order[:rows], distances[:rows])
            for order, distances in searching.rank_gallery(queries, features)]


def test_the_exact_path_is_todays_ranking_in_any_number_of_passes(tmp_path, monkeypatch):
    features, queries = _clustered(3_000, 32)
    gallery = _gallery(_on_disk(tmp_path, features))
    expected = _exact_top(queries, gallery.features, 50)
    monkeypatch.setattr(searching, 'EXACT_DISTANCES', 3_000 * 7)   # 7 queries per pass
    ranked = searching.rank(queries, gallery, None, 50, nprobe=1)
    assert len(ranked) == len(queries)
    # A matrix product of another shape rounds float32 differently (BLAS blocking): the same
    # distances to ~1e-6, and the same order but where two differ by less than that.
    for (order, distances), (want_order, want_distances) in zip(ranked, expected):
        np.testing.assert_allclose(distances, want_distances, rtol=2e-6)
        same = order == want_order
        assert np.all(np.abs(distances[~same] - want_distances[~same]) <= 2e-6 * distances[~same])


def test_the_index_with_every_row_a_candidate_gives_the_exact_order(tmp_path):
    features, queries = _clustered(300, 16)
    features = _on_disk(tmp_path, features)
    index = search_index.build(features, np.arange(300), search_index.plan(300, 16))
    ranked = search_index.rank_candidates(index, queries, features, np.arange(300), 300,
                                          nprobe=10**6)
    for (order, distances), (want_order, want_distances) in zip(
            ranked, _exact_top(queries, features, 300)):
        np.testing.assert_allclose(distances, want_distances, rtol=1e-5, atol=1e-4)
        same = order == want_order      # ties within 1e-5 may swap, nothing else
        assert np.all(np.abs(distances[~same] - want_distances[~same]) <= 1e-5 * distances[~same])


def test_approximate_recall_at_10_against_exact(tmp_path):
    features, queries = _clustered(10_000, 32)
    features = _on_disk(tmp_path, features)
    ids = np.arange(len(features))
    shape = search_index.plan(len(ids), 32)
    assert (shape.nlist, shape.m, shape.nbits) == (128, 8, 8)
    index = search_index.build(features, ids, shape)
    ranked = search_index.rank_candidates(index, queries, features, ids, 10, nprobe=16)
    exact = _exact_top(queries, features, 10)
    recall = np.mean([len(set(order) & set(want)) / 10
                      for (order, _), (want, _) in zip(ranked, exact)])
    assert recall >= 0.95
    assert np.mean([o[0] == w[0] for (o, _), (w, _) in zip(ranked, exact)]) >= 0.99


def test_plans_for_a_million_and_ten_million_images():
    million, ten = search_index.plan(1_000_000, 2048), search_index.plan(10_000_000, 2048)
    assert (million.nlist, million.m, million.nbits) == (1024, 64, 8)
    assert ten.nlist == 4096 and million.fits(search_index.plan(1_500_000, 2048))
    assert not million.fits(ten)
    assert search_index.plan(6, 3) == search_index.Plan('ivfpq', 3, 2, 1, 2)


def test_images_added_and_removed_update_the_index(tmp_path, capsys):
    features, queries = _clustered(2_000, 32)
    path = tmp_path / 'index.npz'
    index, what = search_index.open_index(path, _on_disk(tmp_path, features), np.arange(2_000),
                                          'ivfpq', generation='first')
    assert what == 'built' and index.index.ntotal == 2_000
    # The folder changed: rows 0-99 removed, 50 new images (new ids) appended.
    new_rows = _clustered(50, 32, seed=1)[0] + 5
    ids = np.concatenate([np.arange(100, 2_000), 2_000 + np.arange(50)])
    changed = _on_disk(tmp_path, np.concatenate([features[100:], new_rows]), 'changed.npy')
    index, what = search_index.open_index(path, changed, ids, 'ivfpq', generation='second',
                                          lineage=('first',))
    assert what == 'updated (50 added, 100 removed)'
    assert index.index.ntotal == len(ids) and np.array_equal(index.ids, ids)
    found = search_index.rank_candidates(index, new_rows, changed, ids, 5, nprobe=8)
    assert [order[0] for order, _ in found] == list(range(1_900, 1_950))  # their own rows
    assert all(distances[0] < 1e-3 for _, distances in found)
    reloaded, what = search_index.open_index(path, changed, ids, 'ivfpq', generation='second',
                                             lineage=('first',))
    assert what == 'reused' and np.array_equal(reloaded.ids, ids)
    for order, _ in search_index.rank_candidates(reloaded, queries, changed, ids, 200, nprobe=8):
        assert order.max() < len(ids)
    # A cache whose lineage does not hold the index's generation numbered its rows afresh.
    capsys.readouterr()
    index, what = search_index.open_index(path, changed, ids, 'ivfpq', generation='afresh')
    assert what == 'built' and 'another version of the feature cache' in capsys.readouterr().out


def test_an_unchanged_gallery_reuses_its_index(tmp_path, monkeypatch):
    features = _on_disk(tmp_path, _clustered(1_000, 16)[0])
    path = tmp_path / 'index.npz'
    assert search_index.open_index(path, features, np.arange(1_000), 'ivfpq')[1] == 'built'
    saved = path.stat().st_mtime_ns

    def no_build(*args):
        raise AssertionError('rebuilt')

    monkeypatch.setattr(search_index, 'build', no_build)
    monkeypatch.setattr(search_index, 'save', no_build)
    index, what = search_index.open_index(path, features, np.arange(1_000), 'ivfpq')
    assert what == 'reused' and index.index.ntotal == 1_000
    assert path.stat().st_mtime_ns == saved


def test_an_interrupted_build_leaves_the_previous_index_usable(tmp_path, monkeypatch, capsys):
    features = _clustered(1_200, 16)[0]
    path = tmp_path / 'index.npz'
    search_index.open_index(path, _on_disk(tmp_path, features[:1_000]), np.arange(1_000),
                            'ivfpq')
    grown = _on_disk(tmp_path, features, 'grown.npy')
    monkeypatch.setattr(search_index, 'ADD_CHUNK', 50)
    reads, read_rows = [], search_index.read_rows

    def interrupted_on_the_second_chunk(features, rows):
        reads.append(rows)
        if len(reads) == 2:
            raise KeyboardInterrupt
        return read_rows(features, rows)

    monkeypatch.setattr(search_index, 'read_rows', interrupted_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        search_index.open_index(path, grown, np.arange(1_200), 'ivfpq')
    previous = search_index.load(path)
    assert np.array_equal(previous.ids, np.arange(1_000)) and previous.index.ntotal == 1_000

    def crash_while_saving(*args, **kwargs):       # the disk fills up, say
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(search_index, 'read_rows', read_rows)
    monkeypatch.setattr(np, 'savez', crash_while_saving)
    capsys.readouterr()
    index, what = search_index.open_index(path, grown, np.arange(1_200), 'ivfpq')
    assert what == 'updated (200 added, 0 removed)' and index.index.ntotal == 1_200  # in memory
    assert 'could not be saved' in capsys.readouterr().out
    assert search_index.load(path).index.ntotal == 1_000
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []

    monkeypatch.undo()
    index, what = search_index.open_index(path, grown, np.arange(1_200), 'ivfpq')
    assert what == 'updated (200 added, 0 removed)' and index.index.ntotal == 1_200


def test_a_damaged_or_outgrown_index_is_rebuilt(tmp_path, capsys):
    features = _clustered(4_000, 16)[0]
    path = tmp_path / 'index.npz'
    search_index.open_index(path, _on_disk(tmp_path, features[:100]), np.arange(100), 'ivfpq')
    index, what = search_index.open_index(path, _on_disk(tmp_path, features, 'all.npy'),
                                          np.arange(4_000), 'ivfpq')
    assert what == 'built' and index.plan.nlist == 64
    assert 'it has 8 lists, 4,000 images want 64' in capsys.readouterr().out
    path.write_bytes(path.read_bytes()[:100])
    index, what = search_index.open_index(path, _on_disk(tmp_path, features, 'all.npy'),
                                          np.arange(4_000), 'ivfpq')
    assert what == 'built' and index.index.ntotal == 4_000
    assert 'is rebuilt' in capsys.readouterr().out


def test_a_single_image_gallery_works_with_the_index(tmp_path):
    features = _on_disk(tmp_path, np.ones((1, 8), np.float32))
    index, _ = search_index.open_index(tmp_path / 'index.npz', features, np.array([7]), 'ivfpq')
    ((order, distances),) = search_index.rank_candidates(index, np.zeros((1, 8)), features,
                                                np.array([7]), 20, nprobe=4)
    assert list(order) == [0] and distances[0] == pytest.approx(8)


def test_non_finite_features_never_give_a_ranking(tmp_path):
    features, queries = _clustered(500, 16)
    broken = features.copy()
    broken[123, 4] = np.nan
    with pytest.raises(NonFiniteError, match='gallery features are NaN or infinite'):
        search_index.open_index(tmp_path / 'index.npz', _on_disk(tmp_path, broken, 'nan.npy'),
                                np.arange(500), 'ivfpq')
    assert not (tmp_path / 'index.npz').exists()
    features = _on_disk(tmp_path, features)
    index, _ = search_index.open_index(tmp_path / 'index.npz', features, np.arange(500), 'ivfpq')
    queries[0, 0] = np.inf
    with pytest.raises(NonFiniteError, match='query features are NaN or infinite'):
        search_index.rank_candidates(index, queries, features, np.arange(500), 10, nprobe=4)


def test_search_settings_are_checked():
    import main
    from reidkit.run.errors import UserError
    s = main.load_settings({'QUERY': 'person.jpg', 'GALLERY': 'folder'})
    checks.check_search_switches(s)
    with pytest.raises(UserError, match=r"SEARCH_INDEX='hnsw': valid choices are 'ivfpq'"):
        checks.check_search_switches(s.replace(SEARCH_INDEX='hnsw'))
    for key in ('SEARCH_CSV_ROWS', 'SEARCH_NPROBE'):
        with pytest.raises(UserError, match=f'{key}=0 must be greater than 0'):
            checks.check_search_switches(s.replace(**{key: 0}))
    with pytest.raises(UserError, match='SEARCH_EXACT_UP_TO=-1 must be 0'):
        checks.check_search_switches(s.replace(SEARCH_EXACT_UP_TO=-1))
    # search checks them before anything else (no query or gallery needed to find out)
    with pytest.raises(UserError, match='SEARCH_NPROBE=0 must be greater than 0'):
        main.search(s.replace(SEARCH_NPROBE=0, QUERY='', GALLERY=''))


@pytest.mark.parametrize('inputs', [[], ['--QUERY=person.jpg'], ['--GALLERY=folder']])
def test_train_then_search_without_query_and_gallery_stops_before_training(tmp_path, capsys,
                                                                           inputs):
    import main
    experiments = tmp_path / 'experiments'
    assert main.main(['train', 'search', f'--EXPERIMENTS_DIR={experiments}',
                      '--DATA_ROOT=/nonexistent', *inputs]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: search needs --QUERY=') and len(err.strip().splitlines()) == 1
    assert not experiments.exists()         # no run folder: nothing was trained


# FAISS's GPU API, as far as the index uses it, stood in for on the CPU: the stand-ins refuse
# what FAISS's GPU code refuses (checked against faiss/gpu/GpuIndexIVFPQ.cu, IndexUtils.cu and
# FAISS >= 1.13's Index wrappers) and otherwise search as the CPU index they were copied from.
GPU_SHARED_MEMORY = 48 * 1024       # per block, as FAISS asks the device


class StandInGpuResources:
    made = weakref.WeakSet()        # those not freed yet

    def __init__(self):
        StandInGpuResources.made.add(self)


class StandInClonerOptions:
    def __init__(self):
        self.useFloat16 = False


class StandInGpuIndex:
    """A GpuIndexIVFPQ: no attributes but its own (__slots__, as FAISS >= 1.13 refuses unknown
    ones), k and nprobe up to 2,048, a copy of the CPU index's codes."""
    __slots__ = ('cpu', 'resources', 'options')

    def __init__(self, cpu, resources, options):
        self.cpu, self.resources, self.options = cpu, resources, options

    def search(self, queries, k):
        if k > 2048 or self.cpu.nprobe > 2048:
            raise RuntimeError(f'GPU index only supports min/max-K selection up to 2048 '
                               f'(requested {k})')
        return self.cpu.search(queries, k)


class StandInGpuParameterSpace:
    def set_index_parameter(self, index, name, value):
        assert isinstance(index, StandInGpuIndex) and name == 'nprobe'
        index.cpu.nprobe = value


@pytest.fixture
def gpu_faiss(monkeypatch):
    """The installed faiss with a GPU stood in for; what was copied to the 'GPU' is listed."""
    import faiss
    copied = []

    def index_cpu_to_gpu(resources, device, index, options=None):
        assert isinstance(resources, StandInGpuResources) and device == 0
        if isinstance(index, faiss.IndexFlat):      # the clustering index: a plain flat one
            copied.append(faiss.IndexFlatL2(index.d))
            return copied[-1]
        table = index.pq.M * 2 ** index.pq.nbits * (2 if options and options.useFloat16 else 4)
        if index.pq.nbits != 8:
            raise RuntimeError(f'Bits per code must be 8 (passed {index.pq.nbits})')
        if table > GPU_SHARED_MEMORY:
            raise RuntimeError(f'Device 0 has {GPU_SHARED_MEMORY} bytes of shared memory, while '
                               f'8 bits per code and {index.pq.M} sub-quantizers requires '
                               f'{table} bytes. Consider useFloat16LookupTables')
        copied.append(StandInGpuIndex(faiss.clone_index(index), resources, options))
        return copied[-1]

    for name, value in {'StandardGpuResources': StandInGpuResources,
                        'GpuClonerOptions': StandInClonerOptions,
                        'GpuParameterSpace': StandInGpuParameterSpace,
                        'index_cpu_to_gpu': index_cpu_to_gpu,
                        'get_num_gpus': lambda: 1}.items():
        monkeypatch.setattr(faiss, name, value, raising=False)
    yield copied
    copied.clear()
    gc.collect()
    assert not StandInGpuResources.made         # nothing of the index's keeps them


def test_the_gpu_searches_512_d_features_with_float16_tables_and_keeps_its_resources(
        tmp_path, gpu_faiss, capsys):
    features, queries = _clustered(600, 512)
    features = _on_disk(tmp_path, features)
    ids = np.arange(600)
    shape = search_index.plan(600, 512)
    assert (shape.m, shape.nbits) == (64, 8)        # 64-byte codes: float32 tables do not fit
    index = search_index.build(features, ids, shape)
    # The coarse k-means ran on the 'GPU' and that index was let go (FAISS does not own it).
    clustering = gpu_faiss.pop()
    assert index.index.clustering_index is None and clustering.thisown
    freed = weakref.ref(clustering)
    del clustering
    assert freed() is None and not StandInGpuResources.made
    index.searcher = index.index                     # as without a GPU
    on_cpu = search_index.rank_candidates(index, queries, features, ids, 20, nprobe=8)
    index.searcher = None
    capsys.readouterr()
    for _ in range(2):
        ranked = search_index.rank_candidates(index, queries, features, ids, 20, nprobe=8)
    (searcher,) = gpu_faiss
    assert index.searcher is searcher and searcher.options.useFloat16
    assert index.gpu is searcher.resources and len(StandInGpuResources.made) == 1
    assert 'Note' not in capsys.readouterr().out
    for (order, distances), (want_order, want_distances) in zip(ranked, on_cpu):
        assert np.array_equal(order, want_order) and np.array_equal(distances, want_distances)
    # The gallery changed: the GPU copy is stale, and its resources go with it.
    search_index.update(index, features, ids[:-1])
    assert index.searcher is None and index.gpu is None
    del searcher
    gpu_faiss.clear()
    gc.collect()
    assert not StandInGpuResources.made


def test_more_candidates_than_the_gpu_returns_are_searched_on_the_cpu(tmp_path, gpu_faiss,
                                                                      capsys):
    features, queries = _clustered(2_600, 16)
    features = _on_disk(tmp_path, features)
    ids = np.arange(2_600)
    index = search_index.build(features, ids, search_index.plan(2_600, 16))
    gpu_faiss.clear()
    index.searcher = index.index                     # as without a GPU
    want = search_index.rank_candidates(index, queries[:5], features, ids, 2_100, nprobe=64)
    index.searcher = None
    capsys.readouterr()
    ranked = search_index.rank_candidates(index, queries[:5], features, ids, 2_100, nprobe=64)
    assert isinstance(index.searcher, StandInGpuIndex)       # kept for smaller searches
    out = capsys.readouterr().out
    assert out.count('Note') == 1 and '2,048' in out
    assert 'SEARCH_CSV_ROWS (2,100 candidates per query)' in out
    for (order, distances), (want_order, want_distances) in zip(ranked, want):
        assert np.array_equal(order, want_order) and np.array_equal(distances, want_distances)
    assert len(ranked[0][0]) == 2_100
    # nprobe above the GPU's limit likewise (a gallery of 10M has 4,096 lists)
    index.plan = search_index.Plan('ivfpq', 16, 4_096, 4, 8)
    search_index.rank_candidates(index, queries[:5], features, ids, 10, nprobe=3_000)
    assert 'SEARCH_NPROBE' in capsys.readouterr().out
    search_index.rank_candidates(index, queries[:5], features, ids, 10, nprobe=8)
    assert capsys.readouterr().out == ''


def test_an_index_the_gpu_refuses_is_searched_on_the_cpu_said_once(tmp_path, gpu_faiss,
                                                                  capsys):
    features, queries = _clustered(200, 16)         # under 256 images: 7-bit codes
    features = _on_disk(tmp_path, features)
    ids = np.arange(200)
    index = search_index.build(features, ids, search_index.plan(200, 16))
    capsys.readouterr()
    for _ in range(2):
        search_index.rank_candidates(index, queries, features, ids, 10, nprobe=4)
    out = capsys.readouterr().out
    assert out.count('Note') == 1 and 'Bits per code must be 8' in out
    assert index.searcher is index.index and index.gpu is None      # nothing held for nothing
    gc.collect()
    assert not StandInGpuResources.made
