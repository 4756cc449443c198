"""The events `ModelReplica.execute` yields, as the gateway reads them (over Serve's handle or the
direct channel): ERROR (a refusal before admission carries `http_status` and the model's limits)
and COMPLETED (the result blob, or for a small one the ready websocket frame).
"""

from __future__ import annotations

import time
from typing import Any

from model_runtime.replica.execution import ExecutionResult, torch_saved


def error_event(description: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"status": "ERROR", "description": description, "meta": meta}


def refused_event(http_status: int, description: str, limits: dict[str, int]) -> dict[str, Any]:
    return {**error_event(description), "http_status": http_status, "limits": limits}


def completed_event(job_id: str, result: ExecutionResult, inline_max_bytes: int) -> dict[str, Any]:
    """COMPLETED with the result blob, or, for a small one, the ready binary websocket frame instead.

    The frame is what `nnsight.schema.response.ResponseModel.unpickle()` reads (a `torch.save` of
    the response's fields; the client validates them into its `ResponseModel`), built here so that
    the gateway needs neither torch nor nnsight. It carries the result blob, so the event does not
    carry it a second time through the handle.
    """
    assert result.result is not None
    event: dict[str, Any] = {"status": "COMPLETED", "meta": result.meta}
    if inline_max_bytes and len(result.result) <= inline_max_bytes:
        event["frame"] = torch_saved({"id": job_id, "status": "COMPLETED",
                                      "description": "Your job has been completed.",
                                      "data": result.result, "meta": result.meta})
        result.marks["framed"] = time.time()
    else:
        event["result"] = result.result
    return event
