"""A minimal name -> constructor registry for backbones.

Model entry points are plain functions decorated with :func:`register_model`; they are stored
under their ``__name__`` and built with :func:`create_model`.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from torch import Tensor, nn

ModelFn = TypeVar("ModelFn", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: ModelFn) -> ModelFn:
    """Register a model entry point under its function name.

    Args:
        fn: A callable taking keyword arguments and returning an ``nn.Module``.

    Returns:
        ``fn`` unchanged, so this can be used as a decorator.

    Raises:
        ValueError: If a model with the same name is already registered.
    """
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    """Return the names of all registered models, sorted alphabetically."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: Registered model name (see :func:`list_models`).
        **kwargs: Forwarded to the model's entry point (e.g. ``num_features``, ``dropout``).

    Returns:
        The constructed model.

    Raises:
        ValueError: If ``name`` is not registered; the message lists the valid names.
    """
    try:
        fn = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}") from None
    return fn(**kwargs)


def check_face_input(x: Tensor, model: str, size: tuple[int, int] = (112, 112)) -> None:
    """Raise ``ValueError`` unless ``x`` is ``(N, C, *size)``: the heads are sized for a 7x7 map."""
    if x.dim() != 4 or tuple(x.shape[-2:]) != size:
        raise ValueError(
            f"{model} expects input of shape (N, 3, {size[0]}, {size[1]}), got {tuple(x.shape)}; "
            "its head is sized for a 7x7 final feature map"
        )
