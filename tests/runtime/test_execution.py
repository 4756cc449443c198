"""The execution seam in-process (no Ray): real client payloads against a real tiny model."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import pytest
import torch
import zstandard
from nnsight.schema.request import RequestModel
from nnsight.tracing.backend import Backend

from model_runtime.replica.execution import Envelope, ExecutionLimits, ExecutionResult, execute_request, start_request

PROMPT = "Deep inference lets researchers"


class Capture(Backend):
    def __init__(self) -> None:
        self.blob = b""

    def __call__(self, tracer: Any) -> None:
        self.blob = RequestModel.serialize(tracer, compress=True)


async def _started(model: Any, blob: bytes, envelope: Envelope, limits: ExecutionLimits,
                   on_log: Any) -> ExecutionResult:
    """`start_request` (the replica's call), awaited: its `on_done` resolves a future on this loop."""
    done: asyncio.Future[ExecutionResult] = asyncio.get_running_loop().create_future()
    start_request(model, blob, envelope, limits=limits, on_log=on_log, on_done=done.set_result)
    return await done


def _run(model: Any, blob: bytes, on_loop: bool = False, **limits: Any) -> tuple[Any, list[str]]:
    """Through `execute_request`, or (on_loop) `start_request` called on an event loop, as the model
    replica does."""
    logs: list[str] = []
    envelope, bounds = Envelope(model_key="k", compress=True), ExecutionLimits(**limits)
    if on_loop:
        result = asyncio.run(_started(model, blob, envelope, bounds, logs.append))
    else:
        result = execute_request(model, blob, envelope, limits=bounds, on_log=logs.append)
    return result, logs


def _load(result: Any) -> dict[str, Any]:
    data: dict[str, Any] = torch.load(
        io.BytesIO(zstandard.ZstdDecompressor().decompress(result.result)), weights_only=False
    )
    return data


@pytest.mark.parametrize("on_loop", [False, True], ids=["blocking", "on_loop"])
def test_saves_only_and_equal_to_local(local_model: Any, on_loop: bool) -> None:
    capture = Capture()
    offset = torch.ones(1)
    with local_model.trace(PROMPT, backend=capture):
        print("inside", offset.item())
        hidden = local_model.model.layers[0].output.save()  # noqa: F841 (read back by name)
        logits = local_model.lm_head.output.save()  # noqa: F841
    result, logs = _run(local_model, capture.blob, on_loop)
    assert result.error is None, result.error
    saves = _load(result)
    assert set(saves) == {"hidden", "logits"}  # not the shipped `offset`
    with local_model.trace(PROMPT):
        ref = local_model.lm_head.output.save()
    assert torch.equal(saves["logits"], ref)
    assert logs == ["inside 1.0"]
    assert result.meta["runtime"] > 0 and result.meta["result_bytes"] == len(result.result)


def test_the_result_frame_is_what_the_client_unpickles(local_model: Any) -> None:
    """The replica's inline COMPLETED frame reads back through nnsight's own `ResponseModel.unpickle`
    (the client's path), carrying the result blob and meta; the blob loads with `torch.load`."""
    from nnsight.schema.response import ResponseModel, Status

    from model_runtime.replica.events import completed_event as _completed
    from model_runtime.replica.execution import encode_saves

    capture = Capture()
    with local_model.trace(PROMPT, backend=capture):
        logits = local_model.lm_head.output.save()  # noqa: F841
    result, _ = _run(local_model, capture.blob)
    event = _completed("job-1", result, inline_max_bytes=len(result.result))
    response = ResponseModel.unpickle(event["frame"])
    assert (response.id, response.status, response.data, response.meta) == ("job-1", Status.COMPLETED,
                                                                             result.result, result.meta)
    assert "result" not in event  # carried once, inside the frame
    plain = encode_saves({"x": torch.arange(6.0).view(2, 3)[:, 1], "n": 3}, compress=False)
    loaded = torch.load(io.BytesIO(plain), weights_only=False)
    assert torch.equal(loaded["x"], torch.tensor([1.0, 4.0])) and loaded["n"] == 3


def _torch_saved(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer, pickle_protocol=4, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def _inference_tensor() -> torch.Tensor:
    with torch.inference_mode():
        return torch.ones(3)


def _with_attribute() -> torch.Tensor:
    tensor = torch.randn(3)
    tensor.note = "kept"  # type: ignore[attr-defined]
    return tensor


def _hooked() -> torch.Tensor:
    tensor = torch.ones(2, requires_grad=True)
    tensor.register_hook(lambda grad: grad)
    return tensor


def _recursive_list() -> list[Any]:
    value: list[Any] = [1, torch.ones(1)]
    value.append(value)
    return value


def _saving_cases() -> dict[str, Any]:
    base = torch.arange(24.0).view(4, 6)
    complex_values = torch.randn(3, dtype=torch.complex64)
    return {
        "views of one storage": {"a": base, "b": base[1:], "c": base.t(), "d": base[:, 2], "again": [base, base]},
        "dtypes": {"bf16": torch.ones(3, dtype=torch.bfloat16), "c64": complex_values, "bool": torch.tensor([True]),
                   "i8": torch.zeros(3, dtype=torch.int8), "scalar": torch.tensor(7), "empty": torch.empty(0)},
        "grad, conj": {"g": torch.ones(2, requires_grad=True), "conj": complex_values.conj()},
        "neg bit": {"neg": torch.randn(2, dtype=torch.complex64).conj().imag},
        "plain values": {"l": [1, 2.5, "s", b"b", None, (1, 2), {3: True}], "nested": {"t": [torch.ones(2)]}},
        "a result frame": {"id": "j", "status": "COMPLETED", "data": b"\x00" * 64, "meta": {"runtime": 0.1}},
        # Larger than a pickle frame (64 KiB): written outside the frames, as torch.save's pickler does.
        "a large result frame": {"id": "j", "data": bytes(range(256)) * 1024, "meta": {"gpu": {"0": 1.5}}},
        "plain values only": {"s": "x" * 70_000, "nested": [[1, (2, 3)], {"k": -(2**70)}], "flag": True},
        "a recursive list": _recursive_list(),
        # Keys that are the very (interned) strings of torch's persistent ids and globals: the
        # pickler's memo is by identity, so these are written as back-references there.
        "names torch writes": {"storage": torch.ones(2), "cpu": torch.zeros(2), "FloatStorage": 1,
                               "_rebuild_tensor_v2": torch.ones(1), "OrderedDict": "collections"},
        "quantized": {"q": torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.quint8)},
        "sparse": {"s": torch.eye(3).to_sparse()},
        "views, offsets, inference": {"strided": torch.arange(12.0).view(3, 4)[:, ::2], "offset": torch.arange(9.0)[3:],
                                      "inference": _inference_tensor()},
        # Tensors that Tensor.__reduce_ex__ reduces on its general path (not the plain one).
        "uint16 (v3 dtype)": {"u16": torch.ones(3, dtype=torch.uint16)},
        "attribute, hook, parameter": {"attr": _with_attribute(), "hooked": _hooked(),
                                       "param": torch.nn.Parameter(torch.ones(2))},
        # What torch.save's own hook treats specially: written by torch.save itself.
        "an untyped storage": {"s": torch.ones(3).untyped_storage()},
        "a module class": {"cls": torch.nn.Linear},
    }


@pytest.mark.parametrize("case", list(_saving_cases()))
def test_results_are_torch_saves_bytes(case: str) -> None:
    """The result writer (model_runtime/replica/saving.py) writes exactly torch.save's bytes."""
    from model_runtime.replica.saving import saved_bytes

    value = _saving_cases()[case]
    assert saved_bytes(value) == _torch_saved(value)


def test_results_refused_by_torch_save_are_refused_alike() -> None:
    from model_runtime.replica.saving import saved_bytes

    base = torch.arange(4.0)
    with pytest.raises(RuntimeError, match="different types"):
        saved_bytes([base, base.view(torch.int32)])


@pytest.mark.parametrize("on_loop", [False, True], ids=["blocking", "on_loop"])
def test_timeout_really_stops_and_next_request_is_correct(local_model: Any, on_loop: bool) -> None:
    spin = Capture()
    with local_model.trace(PROMPT, backend=spin):
        local_model.model.layers[0].output.save()
        n = 0
        while True:
            n += 1
    started = time.monotonic()
    result, _ = _run(local_model, spin.blob, on_loop, timeout_seconds=1.0)
    assert result.timed_out and not result.wedged
    assert "timeout" in (result.error or "")
    assert time.monotonic() - started < 5
    good = Capture()
    with local_model.trace(PROMPT, backend=good):
        logits = local_model.lm_head.output.save()  # noqa: F841
    result, _ = _run(local_model, good.blob, on_loop)
    with local_model.trace(PROMPT):
        ref = local_model.lm_head.output.save()
    assert torch.equal(_load(result)["logits"], ref)


def test_stuck_in_c_call_is_reported_wedged(local_model: Any) -> None:
    stuck = Capture()
    with local_model.trace(PROMPT, backend=stuck):
        local_model.model.layers[0].output.save()
        time.sleep(3)  # one C call: the async exception waits for it to return
    result, _ = _run(local_model, stuck.blob, timeout_seconds=0.5, cancel_grace_seconds=0.5)
    assert result.timed_out and result.wedged
    time.sleep(3)  # let the sleeper finish before other tests use the model


@pytest.mark.parametrize("case", ["garbage", "empty", "truncated", "result_too_big", "wrong_compress"])
def test_request_faults_are_errors(local_model: Any, case: str) -> None:
    capture = Capture()
    with local_model.trace(PROMPT, backend=capture):
        local_model.lm_head.output.save()
    blob = {"garbage": b"nonsense", "empty": b"", "truncated": capture.blob[:40]}.get(case, capture.blob)
    logs: list[str] = []
    result = execute_request(local_model, blob, Envelope(model_key="k", compress=case != "wrong_compress"),
                             limits=ExecutionLimits(max_result_bytes=100), on_log=logs.append)
    assert result.result is None
    expected = "exceeds this model's limit" if case == "result_too_big" else "Unreadable request payload"
    assert expected in (result.error or "")
    if case == "wrong_compress":
        assert "zstd-compressed" in (result.error or "")


def test_start_request_answers_once_on_the_loop(local_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`start_request` (the model replica's call): the result comes once, on the caller's loop, for a
    request, a refused payload, and a fault of the server's own after the run (an error answer,
    never silence); nnsight's caches are restored and the thread reused after each."""
    import linecache
    import threading

    from model_runtime.replica import execution

    capture = Capture()
    with local_model.trace(PROMPT, backend=capture):
        logits = local_model.lm_head.output.save()  # noqa: F841
    envelope, limits = Envelope(model_key="k", compress=True), ExecutionLimits()

    async def answers(blob: bytes) -> list[Any]:
        loop_thread, got = threading.get_ident(), []
        over = asyncio.Event()

        def on_done(result: Any) -> None:
            assert threading.get_ident() == loop_thread
            got.append(result)
            over.set()

        execution.start_request(local_model, blob, envelope, limits=limits, on_log=print, on_done=on_done)
        await over.wait()
        await asyncio.sleep(0.05)
        return got

    lines = dict(linecache.cache)
    [good] = asyncio.run(answers(capture.blob))
    assert dict(linecache.cache) == lines
    with local_model.trace(PROMPT):
        ref = local_model.lm_head.output.save()
    assert good.error is None and torch.equal(_load(good)["logits"], ref)
    lines = dict(linecache.cache)
    [refused] = asyncio.run(answers(b""))
    assert refused.result is None and "blob is empty" in (refused.error or "")

    def broken(*_args: Any) -> Any:
        raise RuntimeError("meta failed")

    monkeypatch.setattr(execution._Request, "result", broken)
    [internal] = asyncio.run(answers(capture.blob))
    assert internal.result is None and "Internal error after the request: RuntimeError: meta failed" in internal.error
    assert dict(linecache.cache) == lines
