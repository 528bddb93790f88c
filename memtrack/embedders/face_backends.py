"""The ``face`` embedder's optional recognisers: ArcFace (an insightface ONNX file) and FaceNet.

Both take faces found and landmarked by dlib (:mod:`memtrack.embedders.face`), align them to their own
chip geometry and return L2-normalised vectors. Neither ships weights: ``face.model_path`` names a file
the user obtained. Selected with ``face.backend: arcface | facenet``.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from memtrack.errors import ConfigError, DependencyError
from memtrack.embedders.base import l2_normalise
from memtrack.embedders import face as _face
from memtrack.embedders.face import DLIB_PADDING, FaceOptions, Recognizer, sha256_of

# insightface's ArcFace template for a 112-px chip: eye centres, nose tip, mouth corners (face_align.py)
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


def _model_file(options: FaceOptions, what: str) -> Path:
    if not options.model_path:
        raise ConfigError(f"face.backend {options.backend!r} needs face.model_path: {what}",
                          hint="memtrack downloads no face weights; give the path of a file you obtained")
    path = Path(options.model_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"face.model_path not found: {path}", hint=f"expected {what}")
    return path


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform src -> dst (Umeyama 1991), as a 2x3 matrix."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    fix = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rot = u @ fix @ vt
    scale = (sig * np.diag(fix)).sum() / s.var(0).sum()
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


class ArcFaceRecognizer(Recognizer):
    metric, published_threshold, landmark_points = "cosine", 1.2, 68

    def __init__(self, options: FaceOptions, dlib_dir: Path):
        super().__init__(options, dlib_dir)
        self.path = _model_file(options, "an insightface recognition .onnx file (e.g. w600k_r50.onnx)")
        self.session = _onnx_session(str(self.path), options.device)
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        shape = list(inp.shape)
        if len(shape) != 4 or shape[1] != 3 or not isinstance(shape[2], int) or shape[2] != shape[3]:
            raise ConfigError(f"{self.path.name}: expected an input of shape [N, 3, S, S], got {shape}",
                              hint="an insightface ArcFace recognition model takes [N, 3, 112, 112]")
        self.input_name, self.chip_size = inp.name, int(shape[2])
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        dim = out.shape[-1] if out.shape else None
        self.dim = int(dim) if isinstance(dim, int) else int(self._run(np.zeros((1, 3, self.chip_size, self.chip_size),
                                                                                   np.float32)).shape[-1])

    def align(self, rgb: np.ndarray, shape) -> np.ndarray:
        p = np.array([[q.x, q.y] for q in shape.parts()], dtype=np.float64)
        five = np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])
        m = np.vstack([_similarity(five, ARCFACE_TEMPLATE * self.chip_size / 112.0), [0, 0, 1]])
        inv = np.linalg.inv(m)[:2].ravel()  # PIL maps output pixels back to input pixels
        chip = Image.fromarray(rgb).transform((self.chip_size, self.chip_size), Image.Transform.AFFINE,
                                              tuple(inv), resample=Image.Resampling.BILINEAR)
        return np.asarray(chip, dtype=np.uint8)

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self.fixed_batch == 1:
            return np.concatenate([self.session.run(None, {self.input_name: x[i:i + 1]})[0] for i in range(len(x))])
        return self.session.run(None, {self.input_name: x})[0]

    def embed_chips(self, chips: np.ndarray) -> np.ndarray:
        x = (chips.astype(np.float32).transpose(0, 3, 1, 2) - 127.5) / 127.5
        return l2_normalise(self._run(np.ascontiguousarray(x)).reshape(len(chips), -1))

    def fingerprint(self) -> dict:
        return {"model": self.path.name, "model_sha256": sha256_of(self.path), "input": "(rgb - 127.5) / 127.5",
                "distance": "euclidean on unit rows"}


@functools.lru_cache(maxsize=4)
def _onnx_session(path: str, device: str):
    if importlib.util.find_spec("onnxruntime") is None:
        raise DependencyError("face.backend 'arcface' needs onnxruntime", hint="pip install 'memtrack[arcface]'")
    import onnxruntime as ort

    if device == "cpu":
        providers: list = ["CPUExecutionProvider"]
    elif device.startswith("cuda"):
        providers = [("CUDAExecutionProvider", {"device_id": int(device.partition(":")[2] or 0)})]
    else:
        raise ConfigError(f"face.device must be 'cpu' or 'cuda[:N]', got {device!r}")
    try:
        return ort.InferenceSession(path, providers=providers)
    except Exception as exc:  # onnxruntime raises its own types for unreadable / invalid models
        raise ConfigError(f"cannot load ONNX model {path}: {type(exc).__name__}: {str(exc)[:200]}") from None


class FaceNetRecognizer(Recognizer):
    metric, chip_size, dim, published_threshold = "cosine", 160, 512, 1.04

    def __init__(self, options: FaceOptions, dlib_dir: Path):
        super().__init__(options, dlib_dir)
        if not _face.is_facenet_available():
            raise DependencyError("face.backend 'facenet' needs facenet-pytorch",
                                  hint="pip install --no-deps facenet-pytorch  (its pins would replace torch)")
        self.path = _model_file(options, "an InceptionResnetV1 state_dict (.pt), e.g. 20180402-114759-vggface2.pt")
        import torch
        from facenet_pytorch import InceptionResnetV1

        self.device = torch.device(options.device)
        self.net = InceptionResnetV1(pretrained=None, classify=False).eval()
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith("logits.")]  # the VGGFace2 classifier head
        if missing or unexpected:
            raise ConfigError(f"{self.path.name} is not an InceptionResnetV1 state_dict "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.net.to(self.device)

    def embed_chips(self, chips: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(chips.astype(np.float32).transpose(0, 3, 1, 2)).sub_(127.5).div_(128.0)
        with torch.inference_mode():
            return l2_normalise(self.net(x.to(self.device)).float().cpu().numpy())

    def fingerprint(self) -> dict:
        return {"model": self.path.name, "model_sha256": sha256_of(self.path), "padding": DLIB_PADDING,
                "input": "(rgb - 127.5) / 128", "distance": "euclidean on unit rows"}


BACKENDS: dict[str, type[Recognizer]] = {"arcface": ArcFaceRecognizer, "facenet": FaceNetRecognizer}
for _name, _cls in BACKENDS.items():
    _face.register_recognizer(_name, _cls)
