"""Constructed stand-ins for insightface's antelopev2 ONNX models, in its folder layout, for the tests of omg/faces.py
that run the real insightface + onnxruntime (the real models cannot be downloaded here).

    folder = write_antelopev2(root, faces=[FakeFace(bbox=(100, 60, 260, 260), kps=KPS)])  # root/models/antelopev2

- scrfd_10g_bnkps.onnx: an SCRFD detector's signature (input 1x3xHxW, H and W dynamic as in the real model; nine
  outputs: scores, bbox distances, keypoint distances, each for strides 8, 16, 32 with two anchors per cell, in the
  order insightface's SCRFD reads them). It ignores the pixels: every anchor scores 0 except one per FakeFace, whose
  distances decode to that face's bbox and keypoints in the detector's input frame (det_size, 640x640).
- glintr100.onnx: a recognition model's signature (input Nx3x112x112, output Nx512): a small random conv + linear
  layer with a fixed seed, so its embedding depends on the aligned crop's every colour.

Built with the onnx helper API (no tracing: a second per folder, no exporter quirks).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DETECTOR, RECOGNIZER = "scrfd_10g_bnkps.onnx", "glintr100.onnx"
DET_SIZE = 640  # omg's det_size (insightface letterboxes every photo into this square)
STRIDES = (8, 16, 32)
ANCHORS = 2  # per feature-map cell, as in antelopev2's scrfd_10g_bnkps
OPSET, IR_VERSION = 17, 8  # old enough for any onnxruntime insightface 0.7.3 or 2.1 runs on
EMBEDDING_DIM = 512


@dataclass(frozen=True)
class FakeFace:
    """One face the fake detector reports, in its 640x640 input frame. Its anchor is the cell of `stride` nearest
    the bbox centre; values on a 1/4 grid keep the decoding exact in float32."""
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2
    kps: tuple[tuple[float, float], ...]  # five (x, y): eyes, nose, mouth corners
    stride: int = 32
    anchor: int = 0
    score: float = 0.9

    def centre(self) -> tuple[int, int]:
        """The anchor centre (x, y): a multiple of the stride, as SCRFD's anchor grid is."""
        x1, y1, x2, y2 = self.bbox
        return (int(round((x1 + x2) / 2 / self.stride)) * self.stride,
                int(round((y1 + y2) / 2 / self.stride)) * self.stride)

    def distances(self) -> tuple[np.ndarray, np.ndarray]:
        """(bbox (4,), kps (10,)) predictions in stride units, which SCRFD multiplies by the stride and adds to or
        subtracts from the anchor centre (distance2bbox, distance2kps)."""
        cx, cy = self.centre()
        x1, y1, x2, y2 = self.bbox
        box = np.array([cx - x1, cy - y1, x2 - cx, y2 - cy], np.float32) / self.stride
        kps = (np.asarray(self.kps, np.float32) - np.array([cx, cy], np.float32)).reshape(10) / self.stride
        return box, kps


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value, name))


def _stride_outputs(stride: int, faces: Sequence[FakeFace]) -> tuple[list[onnx.NodeProto], tuple[str, str, str]]:
    """Nodes computing one stride's (scores (N, 1), bbox (N, 4), kps (N, 10)), N = H/s * W/s * ANCHORS, from the
    input's shape alone: an anchor grid like SCRFD's (row-major cells, anchors innermost), a one-hot mask per face."""
    s = f"s{stride}"
    nodes = [
        _const(f"{s}_stride", np.array([stride, stride], np.int64)),
        helper.make_node("Div", ["hw", f"{s}_stride"], [f"{s}_cells"]),  # (H/s, W/s)
        helper.make_node("Gather", [f"{s}_cells", "idx0"], [f"{s}_h"], axis=0),
        helper.make_node("Gather", [f"{s}_cells", "idx1"], [f"{s}_w"], axis=0),
        _const(f"{s}_step", np.array(stride, np.int64)),
        helper.make_node("Mul", [f"{s}_h", f"{s}_step"], [f"{s}_hs"]),
        helper.make_node("Mul", [f"{s}_w", f"{s}_step"], [f"{s}_ws"]),
        helper.make_node("Range", ["zero", f"{s}_hs", f"{s}_step"], [f"{s}_y"]),  # anchor centres' y: 0, s, 2s...
        helper.make_node("Range", ["zero", f"{s}_ws", f"{s}_step"], [f"{s}_x"]),
        helper.make_node("Unsqueeze", [f"{s}_y", "axes12"], [f"{s}_y3"]),  # (h, 1, 1)
        helper.make_node("Unsqueeze", [f"{s}_x", "axes02"], [f"{s}_x3"]),  # (1, w, 1)
        # zeros (N, 1) whose N follows the input's shape, for the outputs of a stride without a face
        helper.make_node("Add", [f"{s}_y3", f"{s}_x3"], [f"{s}_yx"]),
        helper.make_node("Add", [f"{s}_yx", "anchor3"], [f"{s}_yxa"]),
        helper.make_node("Cast", [f"{s}_yxa"], [f"{s}_yxa_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{s}_yxa_f", "fzero"], [f"{s}_zeros3"]),
        helper.make_node("Reshape", [f"{s}_zeros3", "col"], [f"{s}_zeros"]),
    ]
    score, box, kps = f"{s}_zeros", f"{s}_box0", f"{s}_kps0"
    nodes += [helper.make_node("Add", [f"{s}_zeros", "zeros4"], [box]),
              helper.make_node("Add", [f"{s}_zeros", "zeros10"], [kps])]
    for i, face in enumerate(f for f in faces if f.stride == stride):
        f = f"{s}_f{i}"
        (cx, cy), (dbox, dkps) = face.centre(), face.distances()
        nodes += [
            _const(f"{f}_cx", np.array(cx, np.int64)), _const(f"{f}_cy", np.array(cy, np.int64)),
            _const(f"{f}_a", np.array(face.anchor, np.int64)),
            helper.make_node("Equal", [f"{s}_x3", f"{f}_cx"], [f"{f}_ex"]),
            helper.make_node("Equal", [f"{s}_y3", f"{f}_cy"], [f"{f}_ey"]),
            helper.make_node("Equal", ["anchor3", f"{f}_a"], [f"{f}_ea"]),
            helper.make_node("And", [f"{f}_ex", f"{f}_ey"], [f"{f}_exy"]),
            helper.make_node("And", [f"{f}_exy", f"{f}_ea"], [f"{f}_m3"]),  # (h, w, 2): this face's one anchor
            helper.make_node("Cast", [f"{f}_m3"], [f"{f}_m3f"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", [f"{f}_m3f", "col"], [f"{f}_m"]),  # (N, 1)
            _const(f"{f}_score", np.array([[face.score]], np.float32)),
            _const(f"{f}_dbox", dbox[None]), _const(f"{f}_dkps", dkps[None]),
            helper.make_node("Mul", [f"{f}_m", f"{f}_score"], [f"{f}_ms"]),
            helper.make_node("Mul", [f"{f}_m", f"{f}_dbox"], [f"{f}_mb"]),
            helper.make_node("Mul", [f"{f}_m", f"{f}_dkps"], [f"{f}_mk"]),
            helper.make_node("Add", [score, f"{f}_ms"], [f"{f}_score_sum"]),
            helper.make_node("Add", [box, f"{f}_mb"], [f"{f}_box_sum"]),
            helper.make_node("Add", [kps, f"{f}_mk"], [f"{f}_kps_sum"]),
        ]
        score, box, kps = f"{f}_score_sum", f"{f}_box_sum", f"{f}_kps_sum"
    outs = (f"score_{stride}", f"bbox_{stride}", f"kps_{stride}")
    nodes += [helper.make_node("Identity", [v], [o]) for v, o in zip((score, box, kps), outs)]
    return nodes, outs


def detector_model(faces: Sequence[FakeFace]) -> onnx.ModelProto:
    """The fake SCRFD: outputs score_8, score_16, score_32, bbox_8, ..., kps_32 (SCRFD reads output idx as the
    scores of stride idx, idx + 3 as its bboxes, idx + 6 as its keypoints), each (N, C): unbatched, as antelopev2's."""
    for face in faces:
        assert face.stride in STRIDES and 0 <= face.anchor < ANCHORS, face
    nodes = [
        _const("idx0", np.array(0, np.int64)), _const("idx1", np.array(1, np.int64)),
        _const("zero", np.array(0, np.int64)), _const("fzero", np.array(0.0, np.float32)),
        _const("axes12", np.array([1, 2], np.int64)), _const("axes02", np.array([0, 2], np.int64)),
        _const("anchor3", np.arange(ANCHORS, dtype=np.int64).reshape(1, 1, ANCHORS)),
        _const("col", np.array([-1, 1], np.int64)),
        _const("zeros4", np.zeros((1, 4), np.float32)), _const("zeros10", np.zeros((1, 10), np.float32)),
        # the pixels only matter through the input's shape
        helper.make_node("Shape", ["input.1"], ["shape"], name="shape"),
        _const("hw_start", np.array([2], np.int64)), _const("hw_end", np.array([4], np.int64)),
        helper.make_node("Slice", ["shape", "hw_start", "hw_end"], ["hw"]),
    ]
    per_stride = [_stride_outputs(s, faces) for s in STRIDES]
    for stride_nodes, _ in per_stride:
        nodes += stride_nodes
    widths = (1, 4, 10)
    outputs = [helper.make_tensor_value_info(outs[kind], TensorProto.FLOAT, [f"n{stride}", widths[kind]])
               for kind in range(3) for stride, (_, outs) in zip(STRIDES, per_stride)]
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])
    graph = helper.make_graph(nodes, "fake_scrfd", [image], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def recognizer_model(seed: int = 0) -> onnx.ModelProto:
    """The fake glintr100: conv 3->4 (8x8, stride 8) -> relu -> flatten -> linear to 512. Node names avoid
    'Sub'/'Mul' prefixes, which insightface's ArcFaceONNX takes for an mxnet model with its own normalisation
    (mean 0, std 1 instead of the 127.5 / 127.5 the real glintr100 gets)."""
    rng = np.random.default_rng(seed)
    conv_w = rng.standard_normal((4, 3, 8, 8)).astype(np.float32) / 8
    conv_b = rng.standard_normal(4).astype(np.float32) * 0.1
    fc_w = rng.standard_normal((4 * 14 * 14, EMBEDDING_DIM)).astype(np.float32) / 28
    fc_b = rng.standard_normal(EMBEDDING_DIM).astype(np.float32) * 0.1
    inits = [numpy_helper.from_array(v, n) for v, n in ((conv_w, "conv_w"), (conv_b, "conv_b"), (fc_w, "fc_w"),
                                                        (fc_b, "fc_b"))]
    nodes = [
        helper.make_node("Conv", ["input.1", "conv_w", "conv_b"], ["c"], name="conv", kernel_shape=[8, 8],
                         strides=[8, 8]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["embedding"], name="fc"),
    ]
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["batch", 3, 112, 112])
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", EMBEDDING_DIM])
    graph = helper.make_graph(nodes, "fake_glintr100", [image], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def write_antelopev2(root: os.PathLike, faces: Sequence[FakeFace], name: str = "antelopev2",
                     recognizer: bool = True) -> Path:
    """root/models/<name>/ with the fake detector (and recognizer): insightface's layout for FaceAnalysis(name,
    root). Returns the model folder (what omg's face_models names)."""
    folder = Path(root) / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(detector_model(faces), str(folder / DETECTOR))
    if recognizer:
        onnx.save(recognizer_model(), str(folder / RECOGNIZER))
    return folder
