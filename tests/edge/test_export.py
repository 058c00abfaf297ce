"""One ONNX graph (detector + recipe + codebook): checker, onnxruntime vs PyTorch, vs the server's own pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from tests.conftest import yolo
from yolo_vq import Embedder
from yolo_vq.edge.export import ExportError, export, input_size, pair_outputs
from yolo_vq.edge.runner import EdgeError, EdgeModel
from yolo_vq.quant import CodebookError, ProductQuantizer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def scrambled(cfg: str):
    """A YAML model whose convolutions are re-drawn (He init) so scores differ between anchors, as a trained model's do.

    Fresh YAML models score every anchor alike (ties), which leaves the choice among tied rows to the runtime."""
    model = yolo(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, (2 / m.weight[0].numel()) ** 0.5, generator=g)
        head = model.model.model[-1]
        for branch in (head.cv3, getattr(head, "one2one_cv3", None) or ()):
            for seq in branch:  # class logits around -3 with some spread: a few confident anchors per image
                seq[-1].weight.normal_(0, 0.05, generator=g)
                seq[-1].bias.normal_(-3, 1, generator=g)
    return model


def fit_on(model, images, path, *, m=16, **predict_args):
    """A codebook trained on this model's embeddings of ``images`` (jittered copies: enough rows for 256 centroids)."""
    emb = Embedder(model)
    with emb:
        x = np.concatenate([r.vq_embeddings for r in model.predict(images, verbose=False, **predict_args)])
    assert len(x), "no detections to train on"
    rng = np.random.default_rng(0)
    x = np.concatenate([x + rng.normal(0, 0.02, x.shape).astype(np.float32) for _ in range(max(1, 600 // len(x)))])
    pq = ProductQuantizer(dim=emb.dim, m=m, iters=8).fit(torch.from_numpy(x))
    emb.save_codebook(pq, path)
    return path


def onnx_meta(path) -> dict:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.mark.parametrize("cfg, nms", [("yolo11n.yaml", None), ("yolo26n.yaml", None), ("yolo26n.yaml", True),
                                      ("yolov8n.yaml", None)])
def test_export_passes_checker_and_matches_onnxruntime(cfg, nms, tmp_path, bus, zidane):
    model = scrambled(cfg)
    cb = fit_on(model, [bus, zidane], tmp_path / "cb", conf=0.05)
    path, check = export(model, cb, tmp_path / "m.onnx", conf=0.05, nms=nms)
    print(f"{cfg} nms={nms}: {check.line()}")
    assert check.same_detections and check.detections > 20
    assert check.max_box_error <= 1e-3 and check.code_bytes_equal >= 0.99
    meta = onnx_meta(path)
    assert json.loads(meta["end2end"]) is (cfg.startswith("yolo26") and nms is None)
    assert json.loads(meta["code_size"]) == 16 and json.loads(meta["imgsz"]) == [640, 640]
    assert json.loads(meta["codebook_fingerprint"]) == json.loads((tmp_path / "cb.json").read_text())["tensors"]["sha256"]
    assert json.loads(meta["embedding"])["recipe"] == "s4-8stripes-colour-center"
    assert json.loads(meta["names"]) == {str(k): v for k, v in model.names.items()}
    m = EdgeModel(path)
    x = np.zeros((3, 3, 640, 640), np.float32)  # dynamic batch: 3 blank frames
    regions = np.tile(np.float32([0, 0, 640, 640]), (3, 1))
    out = dict(zip(m.outputs, m.session.run(None, {"images": x, "regions": regions})))
    assert out["boxes"].shape == (3, 300, 4) and out["boxes"].dtype == np.float32
    assert out["codes"].shape == (3, 300, 16) and out["codes"].dtype == np.uint8
    assert out["valid"].dtype == bool and out["classes"].dtype == np.int64


def _pairs(edge: dict, result, tol: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Pair edge rows with the rows of an Ultralytics Result by class and box (original px); all rows must pair."""
    got = [edge["xyxy"][None], edge["confidence"][None], edge["class_id"][None], edge["codes"][None],
           np.ones((1, len(edge["xyxy"])), bool)]
    b = result.boxes
    ref = [b.xyxy.numpy()[None], b.conf.numpy()[None], b.cls.numpy().astype(np.int64)[None], result.vq_codes[None],
           np.ones((1, len(b)), bool)]
    a, r, unpaired = pair_outputs(got, ref, 0, tol)
    assert unpaired == 0 and len(a) == len(b) == len(edge["xyxy"]), (len(a), len(b), len(edge["xyxy"]))
    return a, r


def _code_agreement(edges, results) -> tuple[float, int]:
    equal = total = 0
    for e, r in zip(edges, results):
        a, b = _pairs(e, r)
        rel = np.abs(e["xyxy"][a] - r.boxes.xyxy.numpy()[b]) / np.maximum(np.abs(r.boxes.xyxy.numpy()[b]), 1.0)
        assert rel.max(initial=0) <= 1e-3
        equal += int((e["codes"][a] == r.vq_codes[b]).sum())
        total += r.vq_codes[b].size
    return equal / max(total, 1), total


def test_edge_codes_equal_the_server_pipeline_on_real_images(pose_vq, tmp_path, bus, zidane):
    """Real yolo11n-pose: onnxruntime on the edge == Ultralytics predict + Embedder on the server (same input)."""
    model, cb = pose_vq
    path, _ = export(model, cb, tmp_path / "pose.onnx", embeddings=True)
    edges = EdgeModel(path)([bus, zidane])
    with Embedder(model, codebook=cb):
        results = model.predict([bus, zidane], imgsz=640, rect=False, verbose=False)
    rate, n = _code_agreement(edges, results)
    for e, r in zip(edges, results):  # the optional float output is the server's embedding too
        a, b = _pairs(e, r)
        np.testing.assert_allclose(e["embeddings"][a], r.vq_embeddings[b], atol=1e-4)
    print(f"pose, bus + zidane: {sum(len(r) for r in results)} detections, {rate:.2%} of {n} code bytes equal")
    assert sum(len(r) for r in results) >= 5 and rate >= 0.99


def test_source_size_export_reproduces_predicts_rect_input(pose_vq, tmp_path, bikes_frames):
    model, cb = pose_vq
    h, w = bikes_frames[0].shape[:2]
    assert input_size(640, (h, w)) == (288, 640)  # PITFALLS 5: 640x272 -> 640x288 at imgsz 640
    path, _ = export(model, cb, tmp_path / "bikes.onnx", source_size=(h, w), conf=0.1)
    assert json.loads(onnx_meta(path)["imgsz"]) == [288, 640]
    edges = EdgeModel(path)(bikes_frames)
    with Embedder(model, codebook=cb):
        results = model.predict(bikes_frames, imgsz=640, conf=0.1, verbose=False)  # rect letterbox, as index does
    rate, n = _code_agreement(edges, results)
    print(f"bikes frames 30-41 at 288x640: {n // 32} detections, {rate:.2%} of code bytes equal")
    assert n // 32 >= 10 and rate >= 0.99


@pytest.mark.parametrize("n", [0, 1, 400])
def test_class_nms_keeps_what_torchvision_batched_nms_keeps(n):
    """The exportable NMS (one ONNX NonMaxSuppression, no sub-graphs) keeps torchvision's ``batched_nms`` rows, in its
    order, per group; and no boxes give no rows."""
    from torchvision.ops import batched_nms

    from yolo_vq.edge.export import class_nms

    g = torch.Generator().manual_seed(n)
    xy = torch.rand(n, 2, generator=g) * 600
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 120 + 1], 1)
    scores, groups = torch.rand(n, generator=g), torch.randint(0, 5, (n,), generator=g)
    torch.testing.assert_close(class_nms(boxes, scores, groups, 0.5), batched_nms(boxes, scores, groups, 0.5))


def test_onnxruntime_reads_the_tapped_map_right_after_its_layer(pose_vq, tmp_path):
    """With onnxruntime's default execution order, the recipe's first read of the tapped stride-4 map (its rows and
    frame mean) runs before the detector is two layers further, not after the whole detector: the map is read while
    in cache and its NCHWc original freed (~2 ms of 67 per 640 px image, benchmarks/onnx_latency.py). The order
    follows the graph's node order, which a refactor of VQGraph.forward or BoxEmbedder.embed can silently undo."""
    import onnxruntime as ort

    model, cb = pose_vq
    path, _ = export(model, cb, tmp_path / "m.onnx", imgsz=320)
    tap = json.loads(onnx_meta(path)["embedding"])["layers"][0]
    opts = ort.SessionOptions()
    opts.enable_profiling, opts.profile_file_prefix = True, str(tmp_path / "profile")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    session.run(None, {"images": np.zeros((1, 3, 320, 320), np.float32),
                       "regions": np.float32([[0, 0, 320, 320]])})
    events = json.loads(Path(session.end_profiling()).read_text())
    order = [e["name"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    first_read = next(i for i, n in enumerate(order) if n.startswith("/box/"))
    further = next(i for i, n in enumerate(order) if n.startswith(f"/model/model.{tap + 2}/"))
    print(f"{len(order)} nodes; first recipe node #{first_read} ({order[first_read]}), layer {tap + 2} from #{further}")
    assert first_read < further
    # the head's DFL is written out (_DFLSoftmaxInPlace): no Softmax over an inner axis, which onnxruntime runs
    # between two transposes
    dfl = {n.op_type for n in onnx.load(str(path)).graph.node if "/dfl/" in n.name}
    assert dfl and not dfl & {"Softmax", "Transpose"}, dfl


def test_the_dfl_written_out_equals_ultralytics_dfl():
    from ultralytics.nn.modules.block import DFL

    from yolo_vq.edge.export import _DFLSoftmaxInPlace

    dfl = DFL(16)
    x = torch.randn(3, 64, 500, generator=torch.Generator().manual_seed(0)) * 4
    torch.testing.assert_close(_DFLSoftmaxInPlace(dfl)(x), dfl(x), rtol=0, atol=2e-5)


def test_end_to_end_head_matches_predict_without_nms(tmp_path, bus, zidane):
    model = scrambled("yolo26n.yaml")
    cb = fit_on(model, [bus, zidane], tmp_path / "cb", conf=0.3, nms=False)
    path, _ = export(model, cb, tmp_path / "e2e.onnx", conf=0.3, max_det=50)
    edges = EdgeModel(path)([bus, zidane])
    with Embedder(model, codebook=cb):
        results = model.predict([bus, zidane], imgsz=640, rect=False, conf=0.3, max_det=50, nms=False, verbose=False)
    rate, n = _code_agreement(edges, results)
    print(f"yolo26n end-to-end: {n // 16} detections, {rate:.2%} of code bytes equal")
    assert n // 16 >= 10 and rate >= 0.99


def test_export_errors_are_clear(pose_vq, tmp_path, bus):
    model, cb = pose_vq
    with pytest.raises(ExportError, match="obb"):
        export(yolo("yolo11n-obb.yaml"), cb, tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="fp16"):
        export(model, cb, tmp_path / "x.onnx", half=True)
    with pytest.raises(ExportError, match="mode='anchor'"):
        export(model, cb, tmp_path / "x.onnx", recipe="anchor")
    with pytest.raises(ExportError, match="multiple of the model stride 32"):
        export(model, cb, tmp_path / "x.onnx", imgsz=100)
    with pytest.raises(CodebookError, match="does not fit"):  # a codebook of another model
        export(scrambled("yolo11n-pose.yaml"), cb, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_edge_model_refuses_files_without_codes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Ultralytics writes its export next to the model (here: the working directory)
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(EdgeError, match="not a loadable ONNX model"):
        EdgeModel(bad)
    with pytest.raises(EdgeError, match="no such file"):
        EdgeModel(tmp_path / "missing.onnx")
    plain = yolo("yolo11n.yaml").export(format="onnx", imgsz=64, simplify=False, opset=18)  # Ultralytics' own
    with pytest.raises(EdgeError, match="without yolo_vq codes.*yolo-vq export"):
        EdgeModel(plain)


def test_fixed_batch_export_pads_short_batches(tmp_path, bus, zidane):
    model = scrambled("yolo11n.yaml")
    cb = fit_on(model, [bus, zidane], tmp_path / "cb", conf=0.05)
    path, check = export(model, cb, tmp_path / "b2.onnx", conf=0.05, dynamic=False, batch=2, opset=17, max_det=50)
    assert check.same_detections
    m = EdgeModel(path)
    assert m.batch == 2 and m.session.get_inputs()[0].shape == [2, 3, 640, 640]
    three = m([bus, zidane, bus])  # a full batch, then one frame padded with a blank one
    assert [len(d["codes"]) for d in three] == [50, 50, 50]
    np.testing.assert_array_equal(three[0]["codes"], three[2]["codes"])
    np.testing.assert_allclose(three[0]["xyxy"], three[2]["xyxy"], atol=1e-3)


def test_export_cli_writes_a_checked_graph_and_fails_in_one_line(pose_vq, tmp_path, capsys):
    from yolo_vq.cli import main

    model, cb = pose_vq
    out = tmp_path / "cli.onnx"
    assert main(["export", "--model", str(model.ckpt_path), "--codebook", str(cb), "--out", str(out),
                 "--source-size", "640x272", "--max-det", "20"]) == 0
    printed = capsys.readouterr().out
    assert "self-check on 2 images" in printed and "exported:" in printed
    assert EdgeModel(out).input_hw == (288, 640) and EdgeModel(out).meta["max_det"] == 20
    for args, needle in [(["--imgsz", "big"], "--imgsz 'big'"), (["--codebook", str(tmp_path / "nope")], "nope.json"),
                         (["--half"], "fp16")]:
        argv = ["export", "--model", str(model.ckpt_path), "--codebook", str(cb), "--out", str(tmp_path / "e.onnx")]
        assert main(argv + args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "e.onnx").exists()


@pytest.fixture(scope="module", params=["whiten", "mlp"])
def headed_codebook(request, pose_vq, tmp_path_factory, bus, zidane, bikes_frames):
    """A 16-byte codebook of the real yolo11n-pose whose vectors pass through an identity head first (whitening of
    the recipe's vectors to 64 dims; "mlp": the same plus a hidden layer of 32 random units on its outputs, w2
    non-zero so the layer changes the output): the head is saved in the codebook's files."""
    from yolo_vq.features.head import Head, fit_whitening

    model, _ = pose_vq
    emb = Embedder(model)
    with emb:
        x = np.concatenate([r.vq_embeddings for r in model.predict([bus, zidane, *bikes_frames], verbose=False,
                                                                  conf=0.05)])
    head = fit_whitening(x, 64, shrink=1.0)
    rng = np.random.default_rng(0)
    if request.param == "mlp":
        u = (x - head.mean.numpy()) @ head.proj.numpy()
        w1 = rng.normal(0, 1 / (u.std() * 8), (64, 32))
        head = Head(head.mean, head.proj, "mlp", mlp=(w1, rng.normal(0, 0.5, 32), rng.normal(0, 0.3, (32, 64))))
        assert not np.allclose(head.project(x), fit_whitening(x, 64, shrink=1.0).project(x), atol=1e-2)
    y = head.project(np.concatenate([x + rng.normal(0, 0.02, x.shape).astype(np.float32) for _ in range(10)]))
    pq = ProductQuantizer(dim=64, m=16, iters=8).fit(torch.from_numpy(y))
    pq.head = head
    path = tmp_path_factory.mktemp("headed") / "cb"
    emb.save_codebook(pq, path)
    return path


def test_a_codebook_with_a_head_round_trips_and_is_refused_when_tampered(pose_vq, headed_codebook, tmp_path):
    from safetensors.torch import load_file, save_file

    from yolo_vq.quant import load_codebook
    from yolo_vq.quant.io import codebook_paths

    q = load_codebook(headed_codebook)
    assert q.head is not None and (q.head.dim_in, q.head.dim, q.dim, q.input_dim) == (1088, 64, 64, 1088)
    kind = q.meta["head"]["kind"]
    assert kind in ("whiten", "mlp") and q.head.hidden == (32 if kind == "mlp" else 0)
    saved = load_file(str(codebook_paths(headed_codebook)[0]))
    for name, t in q.head.state_dict().items():
        assert torch.equal(t, saved["head." + name]), name  # every buffer, the hidden layer's too, as saved
    emb = Embedder(pose_vq[0], codebook=headed_codebook)
    assert (emb.recipe_dim, emb.dim) == (1088, 64)
    with pytest.raises(ValueError, match="takes dim=1088 vectors"):
        Embedder(pose_vq[0], "s4-stripes", codebook=q)  # another recipe's vectors
    st, js = codebook_paths(headed_codebook)
    damages = [("proj", lambda t: t.update({"head.proj": t["head.proj"][:, :32].contiguous()})),
               ("gone", lambda t: t.pop("head.mean"))]
    if kind == "mlp":
        damages += [("no-w1", lambda t: t.pop("head.w1")),
                    ("w2", lambda t: t.update({"head.w2": t["head.w2"][:16].contiguous()}))]
    else:  # a hidden layer's tensors the JSON does not list
        damages += [("extra", lambda t: t.update({"head.w1": torch.zeros(64, 4), "head.b1": torch.zeros(4),
                                                  "head.w2": torch.zeros(4, 64)}))]
    for name, damage in damages:
        t = load_file(str(st))
        damage(t)
        bad = tmp_path / name
        save_file(t, str(bad) + ".safetensors")
        meta = json.loads(js.read_text())
        meta["tensors"]["sha256"] = None  # so the tensors, not the checksum, are what is judged
        Path(str(bad) + ".json").write_text(json.dumps(meta))
        with pytest.raises(CodebookError, match="head"):
            load_codebook(bad)
    tampered = tmp_path / "tampered"
    data = bytearray(st.read_bytes())
    data[-5] ^= 0xFF  # a byte of the last tensor
    Path(str(tampered) + ".safetensors").write_bytes(bytes(data))
    Path(str(tampered) + ".json").write_text(js.read_text())
    with pytest.raises(CodebookError, match="checksum"):
        load_codebook(tampered)


def test_the_head_runs_inside_the_exported_graph_with_identical_codes(pose_vq, headed_codebook, tmp_path, bus,
                                                                      zidane):
    model, _ = pose_vq
    from yolo_vq.quant import load_codebook

    hidden = load_codebook(headed_codebook).head.hidden
    path, check = export(model, headed_codebook, tmp_path / "headed.onnx", embeddings=True)
    assert ("Relu" in {n.op_type for n in onnx.load(str(path)).graph.node}) == bool(hidden)  # the hidden layer's
    edges = EdgeModel(path)([bus, zidane])
    with Embedder(model, codebook=headed_codebook):
        results = model.predict([bus, zidane], imgsz=640, rect=False, verbose=False)
    rate, n = _code_agreement(edges, results)
    for e, r in zip(edges, results):
        a, b = _pairs(e, r)
        assert e["embeddings"].shape[-1] == r.vq_embeddings.shape[1] == 64
        # float32 rounding of the graph's ops against PyTorch's, amplified by the random hidden layer (w2 ~ 0.3)
        np.testing.assert_allclose(e["embeddings"][a], r.vq_embeddings[b], atol=3e-4 if hidden else 1e-4)
        np.testing.assert_allclose(np.linalg.norm(r.vq_embeddings, axis=1), 1, atol=1e-5)
    print(f"headed codebook: {check.line()}; {rate:.2%} of {n} code bytes equal edge vs server")
    assert rate == 1.0 and n >= 5 * 16
