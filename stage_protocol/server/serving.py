"""The names a stage server answers to, shared by both stage servers. Pure.

A stage server answers to the name it was started with (`--served-model-name`, by default the backend's model) and
to its backend's name (`ocr`, `glm`, `local`, `remote`, …), so a client that asks for `model="ocr"` of a server
started with `--backend ocr` is served; `GET /v1/models` lists both.
"""

from __future__ import annotations

from openai.types import Model


def served_names(model_name: str, backend_name: str) -> tuple[str, ...]:
    """The served name first, then the backend's name when it differs."""
    return (model_name,) if backend_name in ("", model_name) else (model_name, backend_name)


def unknown_model(requested: str | None, names: tuple[str, ...]) -> str | None:
    """Why `requested` is not served here, or None when it is (an empty or missing name asks for the default)."""
    if not requested or requested in names:
        return None
    served = " or ".join(repr(name) for name in names)
    return f"the model {requested!r} is not served here; this server serves {served}"


def model_list(names: tuple[str, ...], created: int, owned_by: str) -> dict[str, object]:
    """The `GET /v1/models` page of `names`."""
    models = [Model(id=name, created=created, object="model", owned_by=owned_by) for name in names]
    return {"object": "list", "data": [model.to_dict(mode="json") for model in models]}
