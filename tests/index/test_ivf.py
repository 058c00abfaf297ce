"""Partitioned (IVF) search: ``Memory`` over the on-disk lists against the flat scan of the same codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.quant._data import low_rank
from yolo_vq import Detections, Memory
from yolo_vq.detections import LIST_ID
from yolo_vq.index.registry import open_store
from yolo_vq.index.store import CodebookBinding, Frame, SourceInfo
from yolo_vq.index.upkeep import sync_lists
from yolo_vq.quant import CoarseQuantizer, ProductQuantizer, load_codebook, save_coarse, save_codebook

D, PER_FRAME, FRAMES, LISTS = 32, 10, 300, 32  # 3000 detections
NAMES = {0: "person", 1: "car", 2: "dog"}
ENGINES = ["faiss", "numpy"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_codebook(folder, x: np.ndarray, lists: int | None = LISTS):
    pq = ProductQuantizer(dim=D, m=8, codebook_size=256, iters=8).fit(torch.from_numpy(x))
    save_codebook(pq, folder / "cb")
    if lists:
        save_coarse(CoarseQuantizer.fit(x, lists, reduced_dim=8), folder / "cb")
    return folder / "cb"


def frames_of(codes: np.ndarray, first_frame: int, rng: np.random.Generator, lists: np.ndarray | None = None,
              ) -> list[Frame]:
    """``codes`` as frames of PER_FRAME detections from ``first_frame`` on: classes cycle, a track per position and
    50 frames, confidences from ``rng``; ``lists`` recorded where given."""
    frames = []
    for f in range(len(codes) // PER_FRAME):
        sl, at = slice(f * PER_FRAME, (f + 1) * PER_FRAME), first_frame + f
        det = Detections(np.tile([0, 0, 10, 10], (PER_FRAME, 1)).astype(np.float32),
                         confidence=rng.uniform(size=PER_FRAME), class_id=np.arange(PER_FRAME) % 3,
                         track_id=np.arange(PER_FRAME) + 100 * (at // 50), codes=codes[sl],
                         data={LIST_ID: lists[sl]} if lists is not None else {})
        frames.append(Frame(at, at / 10, det))
    return frames


def fill(store, x: np.ndarray, codebook, *, source: str = "v.mp4", first_frame: int = 0, with_lists: bool = True):
    """Store ``x`` as detections (:func:`frames_of`, confidences seeded). Returns ``(source id, frames, ids
    stored)``: what ``ListKeeper.stored`` takes."""
    q = load_codebook(codebook)
    codes = q.encode(torch.from_numpy(x)).numpy().astype(np.uint8)
    lists = q.coarse.assign(x) if with_lists and q.coarse is not None else None
    src = store.add_source(SourceInfo(source, source)).id
    frames = frames_of(codes, first_frame, np.random.default_rng(len(x) + first_frame), lists)
    return src, frames, store.add_frames(src, frames)


def build(folder, x, *, lists: int | None = LISTS, synced: bool = True):
    codebook = make_codebook(folder, x, lists)
    idx = folder / "idx"
    binding = CodebookBinding(codebook, embedding={"dim": D}, model_fingerprint=None, names=NAMES)
    with open_store(idx, create=True, codebook=binding) as st:
        fill(st, x, codebook)
        if synced and lists:
            sync_lists(st, load_codebook(st.codebook_path()))
    return idx


@pytest.fixture(scope="module")
def data():
    x = low_rank(PER_FRAME * FRAMES + 50, D, rank=6, seed=3).numpy()
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[: PER_FRAME * FRAMES], x[PER_FRAME * FRAMES :]


@pytest.fixture(scope="module")
def index(data, tmp_path_factory):
    return build(tmp_path_factory.mktemp("ivf"), data[0])


def same(a: list[Detections], b: list[Detections]) -> None:
    """The same results, ties aside: equal scores; the same ids in every group of equal scores except the last
    (a tie across the k-th place may keep either of the tied rows)."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(ra.data["score"], rb.data["score"], rtol=1e-5, atol=1e-6)
        s = np.round(rb.data["score"], 5)
        for v in np.unique(s[s != s[-1]]) if len(s) else ():
            assert set(ra.data["id"][s == v].tolist()) == set(rb.data["id"][s == v].tolist())


@pytest.mark.parametrize("engine", ENGINES)
def test_every_list_probed_equals_the_flat_scan(index, data, engine):
    with Memory(index, mode="ivf", engine=engine) as ivf, Memory(index, mode="flat", engine=engine) as flat:
        assert (ivf.mode, flat.mode, len(ivf), len(flat)) == ("ivf", "flat", len(data[0]), len(data[0]))
        assert ivf.info()["in_lists"] == len(data[0]) and ivf.info()["tail"] == 0
        same(ivf.search(data[1], 10, nprobe=LISTS), flat.search(data[1], 10))
        same(ivf.search(data[1], 10, nprobe=10 * LISTS), flat.search(data[1], 10))


@pytest.mark.parametrize("filters", [{}, {"classes": ["car"]}, {"min_conf": 0.5}], ids=lambda f: ",".join(f) or "none")
@pytest.mark.parametrize("nprobe", [1, 4, LISTS - 1])
def test_faiss_scans_the_probed_lists_in_place_as_the_numpy_engine_scans_them_gathered(index, data, nprobe, filters):
    # faiss: IndexIVFPQ's list scanner over the memory-mapped list slices (unfiltered) or the gathered matching
    # rows; numpy: the rows of the same probed lists gathered and scanned with the quantizer's own tables
    with Memory(index, mode="ivf", engine="faiss") as a, Memory(index, mode="ivf", engine="numpy") as b:
        assert a.lists._scanner is not None and b.lists._scanner is None
        same(a.search(data[1], 10, nprobe=nprobe, **filters), b.search(data[1], 10, nprobe=nprobe, **filters))
        same(a.search(data[1], 3000, nprobe=nprobe, **filters), b.search(data[1], 3000, nprobe=nprobe, **filters))


def test_recall_rises_with_nprobe(index, data):
    with Memory(index, mode="ivf") as ivf, Memory(index, mode="flat") as flat:
        truth = [set(r.data["id"].tolist()) for r in flat.search(data[1], 10)]
        recall = []
        for nprobe in (1, 2, 4, 8, 16, LISTS):
            got = ivf.search(data[1], 10, nprobe=nprobe)
            recall.append(np.mean([len(t & set(g.data["id"].tolist())) / 10 for t, g in zip(truth, got)]))
        assert all(b >= a - 0.02 for a, b in zip(recall, recall[1:])), recall
        assert recall[0] < 0.9 and recall[-1] == 1.0, recall


FILTERS = [
    {"classes": ["car"]},
    {"classes": ["dog", "person"], "min_conf": 0.5},
    {"source": "v.mp4", "time_from": 3.0, "time_to": 12.5},
    {"track": (1, 103)},
    {"min_conf": 0.999},  # very selective: the search widens until it has k or has seen every list
]


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f))
def test_filters_agree_with_the_filtered_flat_scan(index, data, filters):
    with Memory(index, mode="ivf") as ivf, Memory(index, mode="flat") as flat:
        same(ivf.search(data[1], 10, nprobe=LISTS, **filters), flat.search(data[1], 10, **filters))
        allowed = set(flat.filter_ids(**filters).tolist())
        assert set(ivf.filter_ids(**filters).tolist()) == allowed
        for r in ivf.search(data[1], 10, nprobe=2, **filters):  # few lists probed: still only matching rows
            assert set(r.data["id"].tolist()) <= allowed
            assert len(r) == min(10, len(allowed))


def test_a_stored_detection_leaves_itself_out(index, data):
    with Memory(index, mode="ivf") as ivf, Memory(index, mode="flat") as flat:
        own = ivf.store.get([5, 6])
        vec = load_codebook(ivf.store.codebook_path()).decode(torch.from_numpy(own.codes.copy())).numpy()
        a = ivf.search(vec, 10, exclude=[5, 6], nprobe=LISTS)
        same(a, flat.search(vec, 10, exclude=[5, 6]))
        assert not {5, 6} & set(np.concatenate([r.data["id"] for r in a]).tolist())
        assert all(len(r) == 10 for r in ivf.search(vec, 10, exclude=[5, 6]))


def test_the_tail_is_searched_and_refresh_picks_up_new_rows_and_segments(data, tmp_path):
    x = data[0]
    idx = build(tmp_path, x[:2000])
    with Memory(idx, mode="ivf") as ivf:
        assert len(ivf) == 2000
        with open_store(idx) as st:  # another writer: 1000 more detections, not yet in the lists
            fill(st, x[2000:], st.codebook_path(), source="w.mp4")
        assert ivf.refresh() == 1000 and ivf.info()["tail"] == 1000
        with Memory(idx, mode="flat") as flat:
            same(ivf.search(data[1], 10, nprobe=LISTS), flat.search(data[1], 10))
        with open_store(idx) as st:
            sync_lists(st, load_codebook(st.codebook_path()))
        assert ivf.refresh() == 0  # the same detections, now from the lists
        assert ivf.info()["tail"] == 0 and ivf.info()["in_lists"] == 3000
        with Memory(idx, mode="flat") as flat:
            same(ivf.search(data[1], 10, nprobe=LISTS), flat.search(data[1], 10))


def test_rows_stored_without_a_list_are_assigned_from_their_codes(data, tmp_path):
    codebook = make_codebook(tmp_path, data[0])
    idx = tmp_path / "idx"
    binding = CodebookBinding(codebook, embedding={"dim": D}, model_fingerprint=None, names=NAMES)
    with open_store(idx, create=True, codebook=binding) as st:
        fill(st, data[0], codebook, with_lists=False)  # e.g. ingested edge records, or an index made before lists
        assert (st.rows()["list_id"] == -1).all()
        sync_lists(st, load_codebook(st.codebook_path()))
    with Memory(idx, mode="ivf") as ivf, Memory(idx, mode="flat") as flat:
            same(ivf.search(data[1], 10, nprobe=LISTS), flat.search(data[1], 10))


def test_bad_nprobe_and_a_codebook_without_lists(data, index, tmp_path):
    for bad in (0, -3, 1.5, "4", True):
        with pytest.raises(ValueError, match="nprobe must be a positive int"):
            Memory(index, nprobe=bad)
    with Memory(index, mode="ivf", nprobe="all") as ivf:
        assert ivf.effective_nprobe() == LISTS
    with Memory(index, mode="ivf") as ivf, pytest.raises(ValueError, match="nprobe must be a positive int"):
        ivf.search(data[1], 10, nprobe=0)
    flat_idx = build(tmp_path, data[0][:500], lists=None)
    with Memory(flat_idx, nprobe=4) as mem:  # accepted, changes nothing: there are no lists
        assert mem.mode == "flat" and len(mem.search(data[1][:1], 5)[0]) == 5
        with pytest.raises(ValueError, match="nprobe must be a positive int"):
            mem.search(data[1][:1], 5, nprobe=-1)
    with pytest.raises(Exception, match="no search lists .*yolo-vq upgrade"):
        Memory(flat_idx, mode="ivf")


def test_a_filter_widens_the_probe_by_the_fraction_it_keeps(index, data, monkeypatch):
    from yolo_vq.index import ivf as ivf_module

    def recall(got, truth):
        return np.mean([len(set(g.data["id"]) & set(t.data["id"])) / max(len(t), 1) for g, t in zip(got, truth)])

    with Memory(index, mode="ivf") as ivf, Memory(index, mode="flat") as flat:
        truth = flat.search(data[1], 10, min_conf=0.8)  # keeps ~20%
        widened = recall(ivf.search(data[1], 10, nprobe=2, min_conf=0.8), truth)
        plain = recall(ivf.search(data[1], 10, nprobe=2), flat.search(data[1], 10))
        monkeypatch.setattr(ivf_module, "MAX_WIDEN", 1)  # no widening: the filtered search sees 2 lists' matches
        narrow = recall(ivf.search(data[1], 10, nprobe=2, min_conf=0.8), truth)
    assert widened >= plain - 0.05 and widened > narrow + 0.1, (widened, plain, narrow)


def test_results_are_read_from_the_lists_as_the_store_holds_them(data, tmp_path, monkeypatch):
    # a search answers from the segments' rows (no lookup in index.db): every field as Store.get gives it, from
    # two segments and, merged with them, the tail (whose rows come from the store)
    x, rng = data[0], np.random.default_rng(11)
    codebook = make_codebook(tmp_path, x)
    q = load_codebook(codebook)
    codes = q.encode(torch.from_numpy(x)).numpy().astype(np.uint8)
    idx = tmp_path / "idx"
    binding = CodebookBinding(codebook, embedding={"dim": D}, model_fingerprint=None, names=NAMES)
    with open_store(idx, create=True, codebook=binding) as st:
        srcs = [st.add_source(SourceInfo(n, n)).id for n in ("a.mp4", "b.mp4")]
        for part, (a, b) in enumerate([(0, 2400), (2400, 2800), (2800, 3000)]):
            for f in range(a // PER_FRAME, b // PER_FRAME):
                sl = slice(f * PER_FRAME, (f + 1) * PER_FRAME)
                xy = rng.uniform(0, 600, (PER_FRAME, 2))
                det = Detections(np.hstack([xy, xy + rng.uniform(1, 80, (PER_FRAME, 2))]).astype(np.float32),
                                 confidence=rng.uniform(size=PER_FRAME), class_id=rng.integers(0, 3, PER_FRAME),
                                 track_id=np.where(rng.uniform(size=PER_FRAME) < 0.3, -1,
                                                   rng.integers(0, 1 << 20, PER_FRAME)),
                                 codes=codes[sl], data={LIST_ID: q.coarse.assign(x[sl])})
                st.add_frames(srcs[f % 2], [Frame(70_000 + f, f / 7, det)])
            if part < 2:  # the third part stays the tail
                sync_lists(st, q)
    gets = []
    with Memory(idx, mode="ivf") as mem:
        assert len(mem.lists.lists.segments) == 2 and len(mem.scan) == 200
        real_get = mem.store.get
        monkeypatch.setattr(mem.store, "get", lambda ids: gets.append(len(ids)) or real_get(ids))
        queries = np.concatenate([data[1], x[2800:2850]])  # the last ones find tail rows
        results = mem.search(queries, 10, nprobe=4)
        assert 0 < len(gets) < len(queries)  # most from the lists alone; those with tail rows through the store
        seg_of = [np.digitize(r.data["id"], [2400.5, 2800.5]) for r in results]  # 0, 1: the segments; 2: the tail
        assert any(len(set(s.tolist())) == 2 and 2 not in s for s in seg_of)  # rows of both segments in one result
        for r in results:
            want = real_get(r.data["id"])
            for name in ("xyxy", "confidence", "class_id", "track_id", "codes"):
                a, b = getattr(r, name), getattr(want, name)
                assert a.dtype == b.dtype and np.array_equal(a, b), name
            for name in ("id", "source_id", "frame", "time"):
                assert r.data[name].dtype == want.data[name].dtype, name
                assert np.array_equal(r.data[name], want.data[name]), name
            assert set(r.data) == {"id", "source_id", "frame", "time", "score"}


def test_ties_in_the_lists_are_ordered_by_id_with_their_own_rows(data, tmp_path):
    # rows of equal codes (equal distances) come back in id order, as the flat scan orders them, each result with
    # its own row: the copies of a vector are put in lists of falling number, so the kernel (which reports ties in
    # list order) returns them in falling id order and the rows read must be reordered with their ids
    x = np.repeat(data[0][:300], 5, axis=0)
    codebook = make_codebook(tmp_path, data[0])
    codes = load_codebook(codebook).encode(torch.from_numpy(x)).numpy().astype(np.uint8)
    lists = (LISTS - 1 - np.arange(len(x)) % LISTS).astype(np.int32)
    idx = tmp_path / "idx"
    binding = CodebookBinding(codebook, embedding={"dim": D}, model_fingerprint=None, names=NAMES)
    with open_store(idx, create=True, codebook=binding) as st:
        src = st.add_source(SourceInfo("a.mp4", "a.mp4")).id
        st.add_frames(src, frames_of(codes, 0, np.random.default_rng(0), lists))
        sync_lists(st, load_codebook(st.codebook_path()))
    with Memory(idx, mode="ivf") as mem:
        for q in data[0][:60:3]:
            r = mem.search(q[None], 10, nprobe=LISTS - 1)[0]
            ids, score = r.data["id"], r.data["score"]
            assert len(set(score.tolist())) < len(score)  # ties present
            for v in np.unique(score):
                assert np.all(np.diff(ids[score == v]) > 0)
            want = mem.store.get(ids)
            assert np.array_equal(r.confidence, want.confidence) and np.array_equal(r.track_id, want.track_id)
            assert np.array_equal(r.data["frame"], want.data["frame"]) and np.array_equal(r.codes, want.codes)


def test_a_segment_replaced_after_it_was_opened_is_not_mapped(index, data, tmp_path):
    # FAISS maps a segment by name: a file a writer replaced meanwhile (a rebuild reuses names) is refused, and a
    # Memory opened after that maps the new one
    import shutil

    from yolo_vq.index.ivf import ListSearch
    from yolo_vq.index.scan import CodeScan
    from yolo_vq.index.segments import ListsProblem, open_lists

    idx = tmp_path / "idx"
    shutil.copytree(index, idx)
    with Memory(idx, mode="ivf") as mem:
        lists = open_lists(mem.store, mem.codebook.coarse)
        seg = lists.segments[0].path
        shutil.copyfile(seg, seg.with_name("copy"))
        seg.with_name("copy").replace(seg)  # the same bytes, another file
        with pytest.raises(ListsProblem, match="replaced since it was opened"):
            ListSearch(lists, mem.codebook.coarse, CodeScan(mem.codebook))
    with Memory(idx, mode="ivf") as again, Memory(index, mode="ivf") as before:
        same(again.search(data[1], 10, nprobe=4), before.search(data[1], 10, nprobe=4))


def test_lists_without_segments_search_as_empty(data, tmp_path):
    # lists synced before any detection was stored: a manifest with no segments (FAISS cannot stack zero lists)
    codebook = make_codebook(tmp_path, data[0])
    idx = tmp_path / "idx"
    binding = CodebookBinding(codebook, embedding={"dim": D}, model_fingerprint=None, names=NAMES)
    with open_store(idx, create=True, codebook=binding) as st:
        lists = sync_lists(st, load_codebook(st.codebook_path()))[0]
        assert lists.segments == []
        fill(st, data[0][:50], codebook)  # stored after the sync: the tail
    with Memory(idx, mode="ivf") as mem:
        assert mem.mode == "ivf" and len(mem) == 50
        got = mem.search(data[1][:3], 5)
        assert all(len(r) == 5 and set(r.data["id"].tolist()) <= set(range(1, 51)) for r in got)


def test_the_lists_kernel_is_safe_from_several_threads(index, data):
    # each query's probe width sets the kernel's nprobe: threads searching with different widths must not mix them
    from concurrent.futures import ThreadPoolExecutor

    with Memory(index, mode="ivf") as mem:
        mapped, coarse = mem.lists._mapped, mem.codebook.coarse
        q = np.ascontiguousarray(data[1], np.float32)
        want = {p: [mapped.search(x, coarse.probe(x[None], p)[0], 10)[1].tolist() for x in q] for p in (1, 3, 8)}

        def run(p):
            return p, [mapped.search(x, coarse.probe(x[None], p)[0], 10)[1].tolist() for x in q for _ in range(5)][::5]

        with ThreadPoolExecutor(3) as pool:
            for p, got in pool.map(run, [1, 3, 8] * 4):
                assert got == want[p]


@pytest.mark.parametrize("k", [1, 10, 700, 5000])
def test_one_query_the_short_way_equals_the_batched_search(index, data, k):
    # Memory.search answers a lone unfiltered query through ListSearch.nearest_rows (no batch arrays); a batch of
    # two takes the general path: the same rows, fields and scores (k beyond a few lists' rows: more lists probed;
    # beyond every row: what is stored)
    with Memory(index, mode="ivf") as mem:
        assert mem.lists.mapped is not None
        for q in data[1][:5]:
            assert mem._nearest(q, k, 2) is not None  # the short way answers it
            one = mem.search(q, k, nprobe=2)[0]
            two = mem.search(np.stack([q, q]), k, nprobe=2)
            assert len(one) == min(k, len(data[0])) and len(two[0]) == len(one) and len(two[1]) == len(one)
            for name in ("xyxy", "confidence", "class_id", "track_id", "codes"):
                assert np.array_equal(getattr(one, name), getattr(two[0], name)), name
            assert set(one.data) == set(two[0].data)
            for name in one.data:
                assert np.array_equal(one.data[name], two[0].data[name]), name
