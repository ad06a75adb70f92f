"""Random-number-generator states of Python, NumPy and PyTorch, in a form a checkpoint can hold.

A resumed run draws the same random numbers as an uninterrupted one only if every global generator
is put back where it was. :func:`capture_rng_state` records

* ``"python"``: :func:`random.getstate`,
* ``"numpy"``: :func:`numpy.random.get_state` (the legacy global ``RandomState``),
* ``"torch"``: :func:`torch.get_rng_state` (the CPU generator),
* ``"cuda"``: :func:`torch.cuda.get_rng_state_all` (one state per visible GPU), only when CUDA is available,

and :func:`restore_rng_state` sets them back. The captured dict holds only tensors, ints, floats,
strings and ``None``, so a checkpoint holding it loads with ``torch.load(weights_only=True)``: Python's
tuple state and NumPy's array state are converted to int64 tensors and back, bit for bit.

NumPy ``Generator`` objects made with ``np.random.default_rng`` and DataLoader worker seeds are not
global state and are not covered here: seed them from ``(seed, epoch)`` where they are made.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state"]

logger = logging.getLogger(__name__)

_NUMPY_ALGORITHM = "MT19937"
_NUMPY_KEY_LEN = 624
_PYTHON_STATE_LEN = 625  # 624 Mersenne Twister words + the position index


def capture_rng_state() -> dict[str, Any]:
    """Record the global random-number-generator states of Python, NumPy, PyTorch (CPU) and CUDA.

    Returns:
        A dict with keys ``"python"``, ``"numpy"``, ``"torch"`` and, when CUDA is available, ``"cuda"``.
        Every value is built from tensors, ints, floats, strings and ``None`` only, so the dict can be
        stored in a checkpoint loaded with ``torch.load(weights_only=True)``:

        * ``"python"``: ``{"version": int, "state": int64 tensor (625,), "gauss_next": float | None}``;
        * ``"numpy"``: ``{"algorithm": "MT19937", "key": int64 tensor (624,), "pos": int,
          "has_gauss": int, "cached_gaussian": float}``;
        * ``"torch"``: uint8 tensor, the CPU generator state;
        * ``"cuda"``: list of uint8 tensors, one per visible GPU.
    """
    version, words, gauss_next = random.getstate()
    algorithm, key, pos, has_gauss, cached_gaussian = np.random.get_state()  # noqa: NPY002 (the legacy global is what is captured)
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "state": torch.tensor(words, dtype=torch.int64),
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
        "numpy": {
            "algorithm": str(algorithm),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global generators back to a state recorded by :func:`capture_rng_state`.

    Every part is checked before any generator is changed, so a malformed state changes nothing.
    A ``"cuda"`` entry is restored on as many GPUs as both the state and this machine have (with a
    warning when the counts differ) and ignored, with a warning, when CUDA is not available.

    Args:
        state: the dict returned by :func:`capture_rng_state`, possibly after a ``torch.save`` /
            ``torch.load(weights_only=True)`` round trip.

    Raises:
        ValueError: a key is missing or holds something other than what :func:`capture_rng_state`
            writes; the message names the key and what was expected.
    """
    python_state = _python_state(state)
    numpy_state = _numpy_state(state)
    torch_state = _byte_tensor(_require(state, "torch", "rng_state"), "rng_state['torch']")
    cuda_states: list[torch.Tensor] | None = None
    if state.get("cuda") is not None:
        cuda = state["cuda"]
        if not isinstance(cuda, (list, tuple)):
            raise ValueError(
                f"rng_state['cuda']: expected a list of uint8 tensors, got {type(cuda).__name__}"
            )
        cuda_states = [_byte_tensor(t, f"rng_state['cuda'][{i}]") for i, t in enumerate(cuda)]

    random.setstate(python_state)
    np.random.set_state(numpy_state)  # noqa: NPY002
    torch.set_rng_state(torch_state)
    if cuda_states is not None:
        if not torch.cuda.is_available():
            logger.warning(
                "rng state holds %d CUDA generator(s) but CUDA is not available: not restored",
                len(cuda_states),
            )
        else:
            n_devices = torch.cuda.device_count()
            if n_devices != len(cuda_states):
                logger.warning(
                    "rng state holds %d CUDA generator(s), this machine has %d GPU(s): restoring the first %d",
                    len(cuda_states),
                    n_devices,
                    min(n_devices, len(cuda_states)),
                )
            for device, cuda_state in enumerate(cuda_states[:n_devices]):
                torch.cuda.set_rng_state(cuda_state, device)


def _require(mapping: Any, key: str, where: str) -> Any:
    if not isinstance(mapping, dict):
        raise ValueError(f"{where}: expected a dict, got {type(mapping).__name__}")
    if key not in mapping:
        raise ValueError(f"{where}: missing key {key!r} (expected the dict written by capture_rng_state)")
    return mapping[key]


def _int_words(value: Any, where: str, length: int) -> list[int]:
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dim() != 1:
            raise ValueError(
                f"{where}: expected a 1-D integer tensor, got {value.dtype} of shape {tuple(value.shape)}"
            )
        words = [int(w) for w in value.tolist()]
    elif isinstance(value, (list, tuple)) and all(
        isinstance(w, int) and not isinstance(w, bool) for w in value
    ):
        words = [int(w) for w in value]
    else:
        raise ValueError(
            f"{where}: expected a 1-D integer tensor or a list of ints, got {type(value).__name__}"
        )
    if len(words) != length:
        raise ValueError(f"{where}: expected {length} words, got {len(words)}")
    if any(w < 0 or w >= 2**32 for w in words):
        raise ValueError(f"{where}: expected 32-bit unsigned words in [0, 2**32)")
    return words


def _python_state(state: dict[str, Any]) -> tuple[Any, ...]:
    part = _require(state, "python", "rng_state")
    where = "rng_state['python']"
    version = _require(part, "version", where)
    words = _int_words(_require(part, "state", where), f"{where}['state']", _PYTHON_STATE_LEN)
    gauss_next = _require(part, "gauss_next", where)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"{where}['version']: expected an int, got {type(version).__name__}")
    if gauss_next is not None and not isinstance(gauss_next, float):
        raise ValueError(f"{where}['gauss_next']: expected a float or None, got {type(gauss_next).__name__}")
    return (version, tuple(words), gauss_next)


def _numpy_state(state: dict[str, Any]) -> tuple[Any, ...]:
    part = _require(state, "numpy", "rng_state")
    where = "rng_state['numpy']"
    algorithm = _require(part, "algorithm", where)
    if algorithm != _NUMPY_ALGORITHM:
        raise ValueError(f"{where}['algorithm']: expected {_NUMPY_ALGORITHM!r}, got {algorithm!r}")
    key = _int_words(_require(part, "key", where), f"{where}['key']", _NUMPY_KEY_LEN)
    values = []
    for name, kind in (("pos", int), ("has_gauss", int), ("cached_gaussian", float)):
        value = _require(part, name, where)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}[{name!r}]: expected {kind.__name__}, got {type(value).__name__}")
        values.append(value)
    pos, has_gauss, cached_gaussian = values
    return (algorithm, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached_gaussian)


def _byte_tensor(value: Any, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        got = f"{value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{where}: expected a uint8 tensor (a torch generator state), got {got}")
    return value.cpu()
