"""Programs that would sit in one long C call: no request bytecode runs inside it, so neither the
stop checks the compiler inserts nor the asynchronous exception reach it, and the replica would
be replaced as wedged. Each must end at its stop (the source iterates with a stop check, or a
guarded torch kernel raises it) or be refused up front (its size priced before it runs).

`ENDS_AT_STOP` run until the stop; the others are refused before the long call starts.
"""
# ruff: noqa: F401 (the bodies use these names: they are the attack functions' globals)

import itertools
import math
import operator

import torch

from sandbox.attacks import PROMPT, in_trace

ATTACKS = in_trace(globals(), {
    # -- Python: big integers (refused up front) ----------------------------------------------
    "int_power": "x = 10 ** 10**9",
    "int_power_builtin": "x = pow(7, 10**9)",
    "int_square_from_bytes": """
        x = int.from_bytes(b"\\xff" * 10**7, "big")
        y = x * x
    """,
    "int_reduce_mul": "x = operator.mul(2**200000, 3**150000)",
    "factorial": "x = math.factorial(10**7)",
    "quadratic_list_sum": "x = sum([[0]] * 10**6, [])",
    # -- Python: unbounded C iterators (end at the stop) --------------------------------------
    "sum_repeat": "x = sum(itertools.repeat(1))",
    "sum_huge_range": "x = sum(range(10**13))",
    "max_of_count": "x = max(itertools.count())",
    "join_cycle": "x = ''.join(itertools.islice(itertools.cycle('ab'), 10**12))",
    # -- torch: heavy kernels over bounded memory (refused up front) ---------------------------
    "conv_huge_kernel": "y = torch.nn.functional.conv1d(torch.ones(1, 1, 2**22), torch.ones(1, 1, 2**21))",
    "expand_then_sum": "y = torch.ones(1).expand(10**6, 10**5).sum()",
    "unfold_then_sum": "y = torch.zeros(2**20).unfold(0, 2**19, 1).sum()",
    "pool_huge_window": "y = torch.nn.functional.max_pool1d(torch.ones(1, 1, 2**24), 2**23, 1)",
    "einsum_big": "y = torch.einsum('ij,jk->ik', torch.ones(8000, 8000), torch.ones(8000, 8000))",
    "multi_dot_order_search": "y = torch.linalg.multi_dot([torch.ones(1, 1)] * 5000)",
    # -- torch: n log n kernels over bounded memory (refused up front). Inputs are a small random
    # tensor repeated (cheap to make, as costly to sort); each runs 5-50 s on one core unpriced.
    "sort_repeated_halves": "y = torch.rand(2**20, dtype=torch.float16).repeat(2**7).sort()",
    "argsort_rows_descending": "y = torch.rand(2**20).repeat(2**6).view(2**13, 2**13).argsort(dim=1, descending=True)",
    "msort_columns": "y = torch.msort(torch.rand(2**12).repeat(2**14).view(2**13, 2**13))",
    "unique_of_repeats": "y = torch.unique(torch.rand(2**20).repeat(2**6), return_counts=True)",
    "topk_half_of_everything": "y = torch.topk(torch.rand(2**20).repeat(2**6), 2**25)",
    "mode_per_row": "y = torch.rand(2**20).repeat(2**6).view(2**6, 2**20).mode(dim=1)",
    "irfft_prime_length": "y = torch.fft.irfft(torch.rand(2**20).repeat(2**5), n=2**26 - 5)",
    "fft_prime_length": "y = torch.fft.fft(torch.rand(2**20).repeat(2**6)[5:])",  # 2**26 - 5 is prime
    # -- torch: kernels below the product rate (refused up front). Each is priced under ~2 s at
    # the product rate and runs 4-13 s: narrow convolutions (1-4 channels per group: 1-20 GFLOP/s
    # against ~90 for a product) and an 8-byte sort along an outer dimension beyond the caches.
    "conv1d_single_channel_long_kernel": "y = torch.nn.functional.conv1d(torch.ones(1, 1, 2**25), "
                                         "torch.ones(1, 1, 2**10))",
    "conv2d_single_channel_wide_kernel": "y = torch.nn.functional.conv2d(torch.ones(1, 1, 6144, 6144), "
                                         "torch.ones(1, 1, 31, 31))",
    "conv1d_depthwise_long_kernel": "y = torch.nn.functional.conv1d(torch.ones(1, 4, 2**23), "
                                    "torch.ones(4, 1, 2**10), groups=4)",
    "sort_int64_columns_beyond_cache": "y = (torch.rand(2**20) * 2**29).long().repeat(2**4).view(2**7, 2**17)"
                                       ".sort(dim=0)",
    # -- torch: kernels that multiply or pair inside one call (refused up front). Both guards
    # price them whole; the Python fallback guard sees nothing inside them.
    "bilinear_wide": "y = torch.nn.functional.bilinear(torch.ones(2**16, 256), torch.ones(2**16, 256), "
                     "torch.ones(256, 256, 256))",
    # A module a request makes stays in training mode (`.eval()` is not among the methods requests
    # may call), so this takes the layer's unfused path; a served model's layers in eval mode reach
    # the fused kernel (`_transformer_encoder_layer_fwd`, test_native_work prices it directly).
    "encoder_layer_long_sequence": """
        layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
        with torch.no_grad():
            y = layer(torch.ones(1, 2**15, 256))
    """,
    "conv_tbc_long_kernel": "y = torch.conv_tbc(torch.ones(2**16, 1, 64), torch.ones(2**12, 64, 64), "
                            "torch.ones(64), 0)",
    "pdist_many_rows": "y = torch.pdist(torch.ones(2**15, 512))",
    "embedding_bag_one_long_bag": "y = torch.nn.functional.embedding_bag(torch.zeros(2**22, dtype=torch.long), "
                                  "torch.ones(10, 2**16), torch.tensor([0]))",
    "multilabel_margin_wide": "y = torch.nn.functional.multilabel_margin_loss(torch.ones(4, 2**17), "
                              "torch.zeros(4, 2**17, dtype=torch.long))",
    "fractional_pool_huge_window": "y = torch.nn.functional.fractional_max_pool2d(torch.ones(1, 1, 2**12, 2**12), "
                                   "2**11, output_size=2**11)",
    "cholesky_big": "y = torch.cholesky(torch.eye(6000, dtype=torch.float64))",
    # -- torch: one tensor per piece, counted by a size or an integer rather than by memory
    # (refused up front): 10**7 pieces run 5-40 s in one C++ loop
    "unbind_empty_rows": "y = torch.empty(10**7, 0).unbind()",
    "split_into_ones": "y = torch.zeros(10**7).split(1)",
    "chunk_more_than_rows": "y = torch.zeros(10**7).chunk(10**8)",
    "tensor_split_sections": "y = torch.zeros(10).tensor_split(10**7)",  # 10**7 empty pieces of 10 elements
    "iterate_empty_rows": "y = list(torch.empty(10**7, 0))",  # iterating a tensor unbinds it
    # -- torch: a C++ loop over many aten calls (ends at the stop, or refused by a price) -----
    "lstm_long_sequence": "y = torch.nn.LSTM(64, 64)(torch.zeros(10**6, 1, 64))",
    # its slowest single call is the `unbind` of its 10**6 steps (~2 s here): priced
    "gru_long_sequence": "y = torch.nn.GRU(4, 4)(torch.zeros(10**6, 1, 4))",
    # 4 x 3 * 10**4 small steps: every single call is short, the loop runs for seconds
    "gru_many_steps": "y = torch.nn.GRU(4, 4, num_layers=4)(torch.zeros(3 * 10**4, 1, 4))",
})

ENDS_AT_STOP = frozenset({"sum_repeat", "sum_huge_range", "max_of_count", "join_cycle", "gru_many_steps"})
