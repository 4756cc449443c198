"""Unbounded time, memory and result size."""
# ruff: noqa: F841, E722

import torch

from sandbox.attacks import PROMPT


def infinite_loop(model, backend):
    with model.trace(PROMPT, backend=backend):
        n = 0
        while True:
            n += 1
        out = model.lm_head.output.save()


def infinite_loop_swallowing(model, backend):
    with model.trace(PROMPT, backend=backend):
        while True:
            try:
                while True:
                    pass
            except:
                pass
        out = model.lm_head.output.save()


def memory_bomb_tensor(model, backend):
    with model.trace(PROMPT, backend=backend):
        big = torch.ones(2**31)  # 8 GiB of float32
        out = model.lm_head.output.save()


def memory_bomb_list(model, backend):
    with model.trace(PROMPT, backend=backend):
        big = [0] * (2**32)
        out = model.lm_head.output.save()


def oversized_result(model, backend):
    with model.trace(PROMPT, backend=backend):
        big = torch.zeros(4_000_000).save()  # 16 MB against the tests' 4 MiB result cap


def deep_recursion(model, backend):
    with model.trace(PROMPT, backend=backend):

        def down(n):
            return down(n + 1)

        down(0)
        out = model.lm_head.output.save()


ATTACKS = [infinite_loop, infinite_loop_swallowing, memory_bomb_tensor, memory_bomb_list, oversized_result,
           deep_recursion]
