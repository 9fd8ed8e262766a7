"""The registered Galen model as an MLflow pyfunc, written as "models from code" (no pickle).

MLflow stores this file itself with the model and runs it on `mlflow.pyfunc.load_model`; the Galen
model folder (config, safetensors weights, tokenizer) travels as the artifact "model", the
`model` package as bundled code, and the decoding settings the model was evaluated with as
`model_config["predict"]`. The type hints are the signature: a request is a `GalenRequest` (a dict
or a DataFrame row with `task` and that task's fields, images as base64 strings), an answer a
`GalenResponse`; MLflow checks requests against it before `predict` runs.

This file imports only `model`, MLflow and pydantic: it must load where Galen's pipeline code is absent.
"""

from typing import Any, Optional

import mlflow.pyfunc
import pydantic
from mlflow.models import set_model


class GalenRequest(pydantic.BaseModel):
    """One request of `GalenPredictor.predict`; which fields a task needs is checked there."""

    model_config = pydantic.ConfigDict(extra="forbid")

    task: str                               # vqa | caption | classification | grounding | nli | summarization
    image: Optional[str] = None             # base64 of the PNG / JPEG / DICOM file
    question: Optional[str] = None          # vqa
    candidates: Optional[list[str]] = None  # vqa: answer list for trie decoding
    labels: Optional[list[str]] = None      # classification: class names
    text: Optional[str] = None              # grounding phrase, or the article to summarize
    premise: Optional[str] = None           # nli
    hypothesis: Optional[str] = None        # nli


class GalenResponse(pydantic.BaseModel):
    task: str
    answer: str
    box: Optional[list[float]] = None              # grounding: x0, y0, x1, y1 in pixels of the image sent
    scores: Optional[dict[str, float]] = None      # classification / nli: probability per candidate


class GalenPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the Galen model folder once per process; `predict` answers a batch of requests."""

    def load_context(self, context: Any) -> None:
        from galen.model.predict import GalenPredictor, PredictConfig

        config = PredictConfig.from_dict((context.model_config or {}).get("predict"))
        self.predictor = GalenPredictor.load(context.artifacts["model"], config)

    def predict(self, model_input: list[GalenRequest], params: Optional[dict[str, Any]] = None) -> list[GalenResponse]:
        answers = self.predictor.predict([r.model_dump(exclude_none=True) for r in model_input])
        return [GalenResponse(**a) for a in answers]


set_model(GalenPyfunc())
