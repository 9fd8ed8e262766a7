"""The registered CLIP model as an MLflow pyfunc, written as "models from code" (no pickle).

The CLIP model folder (open_clip config, safetensors weights, tokenizer files) travels as
the artifact "model", the `model` package as bundled code. A request embeds an image or a text, or
classifies an image zero-shot over `labels`; images are base64 strings.

This file imports only `model`, MLflow and pydantic: it must load where Galen's pipeline code is absent.
"""

from typing import Any, Optional

import mlflow.pyfunc
import pydantic
from mlflow.models import set_model


class ClipRequest(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    task: str                               # embed_image | embed_text | zero_shot
    image: Optional[str] = None             # base64 of the PNG / JPEG / DICOM file
    text: Optional[str] = None              # embed_text
    labels: Optional[list[str]] = None      # zero_shot: class names


class ClipResponse(pydantic.BaseModel):
    task: str
    embedding: Optional[list[float]] = None        # L2-normalized
    scores: Optional[dict[str, float]] = None      # zero_shot: probability per label


class ClipPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the CLIP model folder once per process; `predict` answers a batch of requests."""

    def load_context(self, context: Any) -> None:
        from galen.model.clip import ClipModel

        self.model = ClipModel.from_pretrained(context.artifacts["model"])

    def predict(self, model_input: list[ClipRequest], params: Optional[dict[str, Any]] = None) -> list[ClipResponse]:
        from galen.model.errors import GalenInputError
        from galen.model.vision import decode_base64_image

        out = []
        for r in model_input:
            if r.task == "embed_text":
                out.append(ClipResponse(task=r.task, embedding=self.model.encode_texts([r.text or ""])[0].tolist()))
                continue
            if r.task not in ("embed_image", "zero_shot") or not r.image:
                raise GalenInputError(f"task {r.task!r} needs an image (base64); tasks: embed_image, embed_text, "
                                      "zero_shot")
            image = decode_base64_image(r.image)
            if r.task == "embed_image":
                out.append(ClipResponse(task=r.task, embedding=self.model.encode_images([image])[0].tolist()))
            else:
                probs = self.model.classify([image], r.labels or [])[0]
                out.append(ClipResponse(task=r.task, scores=dict(zip(r.labels or [], probs.tolist()))))
        return out


set_model(ClipPyfunc())
