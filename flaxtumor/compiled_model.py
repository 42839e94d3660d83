"""A model's serving programs, compiled once at fixed shapes, and cached per checkpoint between processes.

The pipeline calls each model through a `CompiledModel`: sigmoid(model(x)) in float32 at batch `batch_size` (the last
batch is padded, so one shape compiles once), optionally averaged with its horizontal flip (TTA); and the classifier's
Grad-CAM, one image at a time. A call's batches run on a small thread pool: XLA:CPU spreads one small convolution
badly over the cores, and two batches at once took a 40-slice ResUNet pass from 0.94 s to 0.66 s on 2 cores (the
outputs are the same, batch by batch).

The serving cache (`runtime.serving_cache_dir()`, on only where a command line or the app enabled the caches) keeps,
per checkpoint, the weights as flat arrays and each compiled XLA executable. A later process loads those two instead of
rebuilding the model, restoring Orbax, tracing and compiling: about 3 of the 7 seconds of a 40-slice `predict` on 2
CPU cores. An entry's key covers everything the executable depends on: the checkpoint's files (names, sizes, times),
the model code, the JAX/jaxlib/flax versions and the CPU. Any problem with an entry (missing, stale, corrupt,
unwritable) falls back to the normal path, which then rewrites it; the outputs are bit-identical either way.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import logging
import os
import platform
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

KEEP_ENTRIES = 16  # the newest entries kept: each new checkpoint (or retrained one) adds one
# Bump when the cached file formats or the forward below change in a way the source hash would not see.
CACHE_FORMAT = 1
_CODE = [Path(__file__), *sorted((Path(__file__).parent / "models").glob("*.py"))]
_BATCHES = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)), thread_name_prefix="flaxtumor-batch")


def _forward(model: Any, x: jax.Array, tta: bool) -> jax.Array:
    out = jax.nn.sigmoid(model(x).astype(jnp.float32))
    if tta:  # horizontal flip: W is axis 2 of NHWC inputs (and of the segmenter's NHW1 outputs)
        flipped = jax.nn.sigmoid(model(x[:, :, ::-1]).astype(jnp.float32))
        out = (out + (flipped[:, :, ::-1] if out.ndim == 4 else flipped)) / 2
    return out


def _cpu_signature() -> str:
    """What an XLA:CPU executable is specialised to: the machine and its instruction-set flags."""
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = ""
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def cache_entry(checkpoint: Path, root: Path | None) -> Path | None:
    """The serving-cache folder of one checkpoint under `root` (None when the cache is off)."""
    if root is None:
        return None
    import jaxlib

    flax = importlib.metadata.version("flax")  # not `import flax`: its import costs ~0.2 s of every start
    digest = hashlib.sha256(f"format {CACHE_FORMAT}|{jax.__version__}|{jaxlib.__version__}|{flax}|"
                            f"{jax.default_backend()}|{_cpu_signature()}".encode())
    for source in _CODE:
        digest.update(source.read_bytes())
    checkpoint = Path(checkpoint).absolute()
    for f in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        stat = f.stat()
        digest.update(f"{f.relative_to(checkpoint)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return root / f"{checkpoint.name}-{digest.hexdigest()[:24]}"


def _compile_afresh(lowered: Any) -> Any:
    """Compiles without JAX's persistent compilation cache. jaxlib 0.10: an executable taken from that cache serialises
    without its code (loaded again, it fails with "Function ... not found"), so the one we store must be compiled.
    JAX decides once per process whether the cache is on; `reset_cache` makes it decide again."""
    from jax.experimental.compilation_cache import compilation_cache

    persistent = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        return lowered.compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", persistent)
        compilation_cache.reset_cache()


def _prune(root: Path, keep: int) -> None:
    """Removes all but the `keep` most recently written entries under `root`."""
    if not root.is_dir():
        return
    entries = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def _write_atomically(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(data)
    os.replace(f.name, path)


@dataclass(frozen=True)
class Program:
    """One compiled function of the model's weights and an input batch: its cache file name, batch size and body."""

    name: str
    batch: int
    body: Callable[[Any, jax.Array], jax.Array]  # (nnx model in eval mode, NHWC float32 batch) -> array


def forward_program(batch: int, tta: bool) -> Program:
    return Program(f"forward_b{batch}_tta{int(tta)}", batch, lambda model, x: _forward(model, x, tta))


def gradcam_program(stage: int) -> Program:
    """Grad-CAM of one image from backbone `stage`, clamped to the backbone's depth (a test backbone has one stage)."""
    def body(model: Any, x: jax.Array) -> jax.Array:
        from flaxtumor.models.gradcam import gradcam_traced

        return gradcam_traced(model, x, stage=max(stage, -len(model.backbone.stages)))

    return Program(f"gradcam_stage{stage}", 1, body)


class CompiledModel:
    """A model's programs (forward, Grad-CAM) compiled at fixed shapes, built from the model (`load()` gives it,
    called at most once and only when needed) or read from its serving-cache `entry`. Inputs are (N, image_size,
    image_size, channels): 3, or 3(2K+1) for a segmenter with K context slices (its metadata says)."""

    def __init__(self, load: Callable[[], Any], batch_size: int, image_size: int, entry: Path | None = None,
                 channels: int = 3):
        self._load = load
        self._model: Any = None
        self.batch_size, self.image_size, self.entry, self.channels = batch_size, image_size, entry, channels
        self._weights: list[jax.Array] | None = None
        self._executables: dict[str, Any] = {}
        self._verified: set[str] = set()  # executables that have run once

    @property
    def model(self) -> Any:
        """The nnx model in eval mode; restored on first use when the cache supplied everything else."""
        if self._model is None:
            self._model = self._load()
            self._model.eval()
        return self._model

    def prepare(self, tta: bool) -> bool:
        """Reads the forward for `tta` from the cache; on a miss loads the model now, so a bad checkpoint fails here
        rather than at the first call. Returns whether the cache had it."""
        program = forward_program(self.batch_size, tta)
        if program.name in self._executables or self._read(program):
            return True
        _ = self.model
        return False

    def compile(self, tta: bool) -> None:
        """Makes sure the forward for `tta` exists (read from the cache, or compiled and cached)."""
        self._executable(forward_program(self.batch_size, tta))

    def __call__(self, x: np.ndarray, tta: bool) -> np.ndarray:
        """sigmoid(model(x)) in float32, in batches of `batch_size` (the last one padded)."""
        return self._batched(forward_program(self.batch_size, tta), x)

    def gradcam(self, x: np.ndarray, stage: int) -> np.ndarray:
        """Grad-CAM maps (N, H, W) in [0, 1] of the classifier's tumour logit, one image at a time."""
        return self._batched(gradcam_program(stage), x)

    def _batched(self, program: Program, x: np.ndarray) -> np.ndarray:
        n, b = len(x), program.batch
        if not n:
            return np.zeros((0,), np.float32)

        def one(start: int) -> np.ndarray:
            chunk = x[start : start + b]
            pad = b - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            return self._run(program, jnp.asarray(chunk, jnp.float32))[: b - pad]

        # The first batch alone: it builds or verifies the executable; the rest share the pool (see the docstring).
        return np.concatenate([one(0), *_BATCHES.map(one, range(b, n, b))])

    def _run(self, program: Program, x: jax.Array) -> np.ndarray:
        run = self._executable(program)
        if program.name in self._verified:
            return np.asarray(run(self._weights, x))
        try:  # the first call of a cached executable is its real test: a damaged one fails here, not at load
            out = np.asarray(run(self._weights, x))
        except jax.errors.JaxRuntimeError as e:
            log.info("serving cache entry %s failed to run (%s); rebuilding it", self.entry, e)
            self._file(program).unlink(missing_ok=True)
            self._executables[program.name] = self._compile(program)
            out = np.asarray(self._executables[program.name](self._weights, x))
        self._verified.add(program.name)
        return out

    # -- building and caching --------------------------------------------------------------------------------------
    def _input(self, program: Program) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((program.batch, self.image_size, self.image_size, self.channels), jnp.float32)

    def _executable(self, program: Program) -> Any:
        if program.name not in self._executables and not self._read(program):
            self._executables[program.name] = self._compile(program)
        return self._executables[program.name]

    def _compile(self, program: Program) -> Any:
        from flax import nnx

        from flaxtumor.checkpoints import INFERENCE_STATE

        graphdef, weights, rest = nnx.split(self.model, INFERENCE_STATE, ...)
        leaves, treedef = jax.tree.flatten(weights)
        # One device: a pipeline call is a few slices, and the executable must not depend on the device count.
        self._weights = [jax.device_put(leaf, jax.devices()[0]) for leaf in leaves]

        def run(leaves: list[jax.Array], x: jax.Array) -> jax.Array:
            return program.body(nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), rest), x)

        lowered = jax.jit(run).lower(self._weights, self._input(program))
        if self.entry is None:
            return lowered.compile()
        compiled = _compile_afresh(lowered)
        self._write(program, compiled)
        return compiled

    def _file(self, program: Program) -> Path:
        return self.entry / f"{program.name}_s{self.image_size}.xla"

    def _read(self, program: Program) -> bool:
        if self.entry is None or not self._file(program).is_file():
            return False
        from jax.experimental.serialize_executable import deserialize_and_load

        try:
            weights = self._weights
            if weights is None:
                with np.load(self.entry / "weights.npz") as saved:
                    weights = [jax.device_put(saved[f"w{i}"], jax.devices()[0]) for i in range(len(saved.files))]
            in_tree = jax.tree.structure(((weights, self._input(program)), {}))
            compiled = deserialize_and_load(self._file(program).read_bytes(), in_tree, jax.tree.structure(0),
                                            execution_devices=jax.devices()[:1])
        except Exception as e:  # noqa: BLE001 — a damaged entry has many failure types; all mean "rebuild it"
            log.info("serving cache entry %s unusable (%s: %s); rebuilding it", self.entry, type(e).__name__, e)
            return False
        self._weights, self._executables[program.name] = weights, compiled
        return True

    def _write(self, program: Program, compiled: Any) -> None:
        from jax.experimental.serialize_executable import serialize

        weights_file = self.entry / "weights.npz"
        try:
            if not self.entry.is_dir():
                _prune(self.entry.parent, KEEP_ENTRIES - 1)
            self.entry.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not weights_file.is_file():
                buffer = io.BytesIO()
                np.savez(buffer, **{f"w{i}": np.asarray(w) for i, w in enumerate(self._weights)})
                _write_atomically(weights_file, buffer.getvalue())
            _write_atomically(self._file(program), serialize(compiled)[0])
        except Exception as e:  # noqa: BLE001 — a cache that cannot be written is simply not used
            log.info("serving cache entry %s not written (%s: %s)", self.entry, type(e).__name__, e)
