"""Which aten ops are priced before they run, and in what unit.

`COSTS` is the one table of priced ops: the native guard receives it when it loads (its kernels
compute the same formulas, `native/work_bounds.h`) and the Python fallback guard reads it
(`cost_kind`). An op not in it is not priced. The formulas that turn a call's arguments into
work are in `op_work`; the rates that turn work into seconds in `rates`.
"""

from __future__ import annotations

import enum


class Cost(enum.IntEnum):
    """How an op is priced (mirrors `work_bounds::Cost`)."""

    NONE = 0
    MATMUL = 1  # A (..., n, k) @ B (..., k, m): 2 * numel(A) * m
    CONV = 2  # 2 * batch * output positions * numel(weight) (input positions when transposed)
    ATTENTION = 3  # 2 * query rows * keys * (E + Ev)
    CUBIC = 4  # A (..., m, n): numel(A) * min(m, n)
    POOL = 5  # output positions * window size, in elements read
    VIEW = 6  # elements of the view made (after it is made)
    PAIRWISE = 7  # x1 (..., P, M), x2 (..., R, M): 2 * numel(x1) * R
    CHAIN = 8  # a product chain's order search: n**3 steps for n operands
    RECURRENT = 9  # steps * (2 * weights + a fixed cost per step)
    NLOGN = 10  # numel * log2(length along `dim`, or of the dims transformed, or numel): compare steps
    LINEAR = 11  # x (..., k) by W (m, k, ...): 2 * numel(x) * m (`out_features` when W is packed)
    TRILINEAR = 12  # i1, i2, i3 over one index space (`bilinear`): 2 * its size
    ENCODER = 13  # a fused encoder layer: 2 * rows * its weights + attention (4 * rows * L * E)
    BAG = 14  # embedding bags: numel(indices) * weight columns, in elements read
    ROW_PAIRS = 15  # every pair of rows (`pdist`): numel(x) * rows / 2, in elements read
    LABEL_PAIRS = 16  # every (target, class) pair per row (multilabel margin): numel(x) * columns, elements
    OUTPUTS = 17  # one tensor per piece (`unbind`, `split`, `chunk`, `tensor_split`): tensors made
    # Not in the table: how a CONV op is priced when its channel block is narrow (`op_work.priced_kind`)
    NARROW_CONV = 18  # as CONV, at the slower of the product rate and the narrow convolution rate


# aten op names (all overloads, out= variants included). Composite ops (`matmul`, `linear`,
# `einsum`, `conv2d`, `scaled_dot_product_attention`'s math path, `matrix_power`, `cdist`'s
# matmul path) decompose into these at the dispatcher, so pricing the bottom ops prices them.
_FAMILIES: dict[Cost, tuple[str, ...]] = {
    Cost.MATMUL: (
        "mm", "bmm", "addmm", "baddbmm", "addbmm", "addmm_", "baddbmm_", "addbmm_", "_addmm_activation", "_int_mm",
        "_scaled_mm", "_scaled_mm_v2", "_grouped_mm", "_scaled_grouped_mm", "_scaled_grouped_mm_v2",
        "_sparse_addmm", "sspaddmm", "_sparse_sparse_matmul", "hspmm", "_sparse_semi_structured_mm",
        "_sparse_semi_structured_addmm", "_sparse_mm_reduce_impl", "sparse_sampled_addmm",
    ),
    Cost.CONV: (
        "convolution", "_convolution", "convolution_overrideable", "mkldnn_convolution", "cudnn_convolution",
        "cudnn_convolution_transpose", "miopen_convolution", "miopen_convolution_transpose",
        "miopen_depthwise_convolution", "_slow_conv2d_forward", "slow_conv3d_forward", "_conv_depthwise2d",
        "conv_depthwise3d", "slow_conv_dilated2d", "slow_conv_dilated3d", "slow_conv_transpose2d",
        "slow_conv_transpose3d", "_nnpack_spatial_convolution", "cudnn_convolution_relu",
        "cudnn_convolution_add_relu", "_mps_convolution", "_mps_convolution_transpose", "conv_tbc",
        "miopen_convolution_relu", "miopen_convolution_add_relu",
    ),
    Cost.ATTENTION: (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable", "_flash_attention_forward",
        "_efficient_attention_forward", "_native_multi_head_attention", "_cudnn_attention_forward",
        "_flash_attention_forward_no_dropout_inplace", "_scaled_dot_product_attention_math_for_mps",
        "_triton_scaled_dot_attention", "_triton_multi_head_attention",
    ),
    Cost.CUBIC: (
        "_linalg_eigh", "linalg_eig", "_linalg_eigvals", "linalg_eigvals", "_linalg_svd", "linalg_qr",
        "_linalg_solve_ex", "linalg_lu_factor_ex", "linalg_lu", "linalg_inv_ex", "_linalg_det", "_linalg_slogdet",
        "linalg_cholesky_ex", "linalg_householder_product", "linalg_solve_triangular", "triangular_solve",
        "linalg_lstsq", "linalg_matrix_exp", "cholesky_solve", "cholesky_inverse", "ormqr", "geqrf", "lu_solve",
        "linalg_lu_solve", "linalg_ldl_factor_ex", "linalg_ldl_solve", "cholesky", "linalg_pinv",
    ),
    Cost.POOL: (
        "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
        "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d", "mkldnn_max_pool2d",
        "mkldnn_max_pool3d", "quantized_max_pool1d", "quantized_max_pool2d", "quantized_max_pool3d",
        "fractional_max_pool2d", "fractional_max_pool3d",
    ),
    Cost.VIEW: ("expand", "as_strided", "as_strided_", "unfold", "set_", "_reshape_alias"),
    Cost.PAIRWISE: ("_cdist_forward", "_euclidean_dist"),
    Cost.CHAIN: ("linalg_multi_dot", "chain_matmul"),
    # `mkldnn_rnn_layer` (one layer of a CPU LSTM over its whole sequence), `_euclidean_dist`
    # (`cdist`'s product path) and `_native_multi_head_attention` (`MultiheadAttention`'s inference
    # fast path; its projections are not counted) are what the Python fallback guard sees of
    # `lstm`, `cdist` and attention: their kernels' own aten calls run below its dispatch mode.
    Cost.RECURRENT: (
        "lstm", "gru", "rnn_tanh", "rnn_relu", "mkldnn_rnn", "mkldnn_rnn_layer", "_cudnn_rnn", "miopen_rnn",
    ),
    # Selection (kthvalue, median) is linear on average: priced as a sort, an upper bound.
    # `unique_consecutive` and `searchsorted` are linear (or m log n) in memory: not priced.
    Cost.NLOGN: (
        "sort", "topk", "kthvalue", "median", "nanmedian", "mode", "_unique", "_unique2", "unique_dim",
        "_fft_r2c", "_fft_c2r", "_fft_c2c",
    ),
    # Kernels that multiply inside one call: the Python fallback guard sees them whole (the native
    # key also sees their inner products, but a price refuses them before they start).
    # `linear.out` only: `linear` decomposes above both guards, its `out=` form (`F.linear(..., out=y)`)
    # is one kernel.
    Cost.LINEAR: (
        "linear.out", "_sparse_semi_structured_linear", "mkldnn_linear", "_compute_linear_combination",
        "_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_dyn_quant_matmul_4bit",
    ),
    Cost.TRILINEAR: ("_trilinear",),
    Cost.ENCODER: ("_transformer_encoder_layer_fwd",),
    Cost.BAG: ("_embedding_bag", "_embedding_bag_forward_only"),
    Cost.ROW_PAIRS: ("_pdist_forward",),
    Cost.LABEL_PAIRS: ("multilabel_margin_loss_forward",),
    # Ops that make one tensor per piece: their count follows a size or an integer argument, not
    # the memory they touch (`torch.empty(10**7, 0).unbind()` reads no bytes and makes 10**7
    # tensors, 0.4-4.6 us each on one x86 core), and the loop that makes them runs in C++ with no
    # aten call the stop could reach (each piece is a view: no guard kernel). `chunk` and
    # `tensor_split` are composite: priced whole by the native key, through `split` (and the
    # stop-checked `slice` calls of `tensor_split`) by the Python fallback guard.
    Cost.OUTPUTS: ("unbind", "unbind_copy", "split", "unsafe_split", "split_copy", "chunk", "unsafe_chunk",
                   "tensor_split"),
}
# Kinds priced in elements read (at the reduction rate) or in n log n steps; the others in float ops.
# Pooling windows are compare or add loops (0.2-4 G window elements/s on one x86 core, far below a
# product's rate).
ELEMENT_KINDS = frozenset({Cost.VIEW, Cost.CHAIN, Cost.BAG, Cost.ROW_PAIRS, Cost.LABEL_PAIRS, Cost.POOL})
# By op name (all its overloads), or "name.overload" for one overload.
COSTS: dict[str, int] = {name: int(kind) for kind, names in _FAMILIES.items() for name in names}


def cost_kind(name: str, overload: str) -> int:
    """How the op `aten::name` (overload `overload`, "" for the default) is priced; 0: not."""
    return COSTS.get(f"{name}.{overload}", COSTS.get(name, 0))
