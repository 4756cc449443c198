// Per-request work bounds for the guard's kernels (included by write_guard.cpp; see
// model_runtime/sandbox/work_bounds/).
//
// A thread inside one long kernel runs no Python, so neither the request's cooperative stop nor
// the asynchronous exception reaches it. While a request runs, its thread has a Budget bound:
//   * the request's stop sets `stopped`; every guarded kernel checks it before running, so a
//     composite op looping over many aten calls in C++ ends at the next call after the stop;
//   * an op whose cost is superlinear in the memory it touches (matrix products, convolutions,
//     attention, cubic linear algebra, pooling windows) or a view whose logical size is not
//     bounded by memory (expand, as_strided, unfold, set_ with a size) is priced from its argument
//     sizes before it runs and refused when it cannot finish before the request's limit at the
//     replica's measured rate;
//   * an n log n op (sorts, top-k, selection, unique, FFTs) is priced in compare steps
//     (elements x log2 of the length sorted or transformed) at the replica's measured sort rate.

#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace work_bounds {

enum class Cost : int8_t {
  kNone, kMatmul, kConv, kAttention, kCubic, kPool, kView, kPairwise, kChain, kRecurrent, kNLogN,
  kLinear, kTrilinear, kEncoder, kBag, kRowPairs, kLabelPairs, kOutputs,
  kNarrowConv,  // not in the table: how a kConv op with a narrow channel block is priced (priced_kind)
};

// Kinds priced in elements read, at the reduction rate (the others: float ops, or n log n steps).
inline bool in_elements(Cost kind) {
  return kind == Cost::kView || kind == Cost::kChain || kind == Cost::kBag || kind == Cost::kRowPairs ||
         kind == Cost::kLabelPairs || kind == Cost::kPool;
}

// The replica's rates, set once at start (work_bounds/rates.py measures the CPU's).
struct Rates {
  double cpu_flops = 0;        // multiply-adds x2 per second on this replica's CPU, float32 (measured)
  std::array<double, static_cast<size_t>(c10::ScalarType::NumOptions)> cpu_flops_by_dtype{};  // measured ones
  double cpu_elements = 0;     // elements read per second by a reduction on the CPU (measured)
  double device_flops = 0;     // the same for accelerator tensors (a documented cap)
  double device_elements = 0;
  double cpu_steps = 0;        // n log2 n steps per second of the slowest measured sort or FFT on the CPU
  double device_steps = 0;     // the same for accelerator tensors (a documented cap)
  double cpu_cubic = 0;        // numel x min(m, n) per second of the slowest measured factorisation (eigh, svd)
  double cpu_tensors = 0;      // tensors per second a split makes (host work, whatever the device)
  double cpu_narrow_conv = 0;  // float ops/s of the slowest measured narrow convolution (single-channel, depthwise)
};
inline Rates g_rates;

// The replica's rates (once, at start; rates.install): float ops/s on the CPU by dtype name
// ("Float", "Long", ...), and the others by their name in rates.measure_rates.
inline void set_rates(const std::map<std::string, double>& cpu_flops, const std::map<std::string, double>& others) {
  Rates rates;
  for (const auto& entry : cpu_flops) {
    for (size_t i = 0; i < rates.cpu_flops_by_dtype.size(); ++i) {
      if (entry.first == c10::toString(static_cast<c10::ScalarType>(i))) {
        rates.cpu_flops_by_dtype[i] = entry.second;
      }
    }
  }
  const auto float_rate = cpu_flops.find("Float");
  rates.cpu_flops = float_rate != cpu_flops.end() ? float_rate->second : 0;
  const auto named = [&others](const char* name) {
    const auto found = others.find(name);
    return found != others.end() ? found->second : 0.0;
  };
  rates.cpu_elements = named("cpu_elements");
  rates.device_flops = named("device_flops");
  rates.device_elements = named("device_elements");
  rates.cpu_steps = named("cpu_steps");
  rates.device_steps = named("device_steps");
  rates.cpu_cubic = named("cpu_cubic");
  rates.cpu_tensors = named("cpu_tensors");
  rates.cpu_narrow_conv = named("cpu_narrow_conv");
  g_rates = rates;
}

struct Budget {
  std::atomic<bool> stopped{false};
  double limit_at = 0;  // steady-clock seconds past which no op may be expected to run
  size_t cancel = 0;    // which of the installed stop types the stop raises
};

inline thread_local std::shared_ptr<Budget> t_budget;

// A convolution whose in x out channels per group are fewer than this runs far below a product's
// rate (op_work.NARROW_CHANNELS).
constexpr int64_t kNarrowChannels = 256;
// ... and slower still once its unfolded input per group outgrows the caches: its float ops count
// kNarrowLargeSlowdown times above kNarrowLargeElements (op_work.NARROW_LARGE_ELEMENTS).
constexpr double kNarrowLargeElements = 4194304.0;  // 2**22
constexpr double kNarrowLargeSlowdown = 8.0;

// Sorting 8-byte elements over more than this many bytes runs below the rate measured in cache;
// its steps count kLargeSortSlowdown times (op_work.LARGE_SORT_BYTES).
constexpr double kLargeSortBytes = 8388608.0;  // 2**23
constexpr double kLargeSortSlowdown = 2.5;

// A recurrent step's fixed cost in float-op equivalents (~3 us of kernel launches per step on a
// CPU core): a long sequence of tiny steps is slow whatever its weights.
constexpr double kStepFlops = 1e5;

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

inline double product(c10::IntArrayRef sizes, size_t from = 0) {
  double p = 1;
  for (size_t i = from; i < sizes.size(); ++i) {
    p *= static_cast<double>(sizes[i]);
  }
  return p;
}

// The argument named `name`, or nullptr.
inline const c10::IValue* arg(const c10::FunctionSchema& schema, c10::ArrayRef<c10::IValue> args, const char* name) {
  const auto index = schema.argumentIndexWithName(name);
  return index.has_value() && *index < args.size() ? &args[*index] : nullptr;
}

inline const at::Tensor* tensor_arg(const c10::FunctionSchema& schema, c10::ArrayRef<c10::IValue> args,
                                    std::initializer_list<const char*> names) {
  for (const char* name : names) {
    const c10::IValue* value = arg(schema, args, name);
    if (value != nullptr && value->isTensor() && value->toTensor().defined()) {
      return &value->toTensor();
    }
  }
  return nullptr;
}

inline std::vector<int64_t> int_list(const c10::FunctionSchema& schema, c10::ArrayRef<c10::IValue> args,
                                     const char* name) {
  const c10::IValue* value = arg(schema, args, name);
  if (value == nullptr || !value->isIntList()) {
    return {};
  }
  return value->toIntVector();
}

inline int64_t at_or(const std::vector<int64_t>& values, size_t i, int64_t fallback) {
  if (values.empty()) {
    return fallback;
  }
  return values[std::min(i, values.size() - 1)];
}

// Output extent of a sliding window (convolution, pooling) along one dimension.
inline double window_out(int64_t in, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  const double span = static_cast<double>(dilation) * static_cast<double>(kernel - 1) + 1;
  const double room = static_cast<double>(in) + 2.0 * static_cast<double>(padding) - span;
  return room < 0 ? 0 : std::floor(room / static_cast<double>(std::max<int64_t>(stride, 1))) + 1;
}

// A product's operands by argument name, first match first (also how the typed kernels pick them).
constexpr std::initializer_list<const char*> kMatmulLeft = {"mat1", "batch1", "self"};
constexpr std::initializer_list<const char*> kMatmulRight = {"mat2", "batch2", "other"};

inline double matmul_flops(const at::Tensor& a, const at::Tensor& b) {
  return b.dim() < 1 ? 0 : 2.0 * static_cast<double>(a.numel()) * static_cast<double>(b.size(-1));
}

// Floating-point operations (or, for kView, elements) the op is about to do; 0 when unknown.
inline double cost_of(Cost kind, const c10::OperatorHandle& op, c10::ArrayRef<c10::IValue> args) {
  const auto& schema = op.schema();
  switch (kind) {
    case Cost::kMatmul: {  // A (..., n, k) @ B (..., k, m): 2 * numel(A) * m
      const at::Tensor* a = tensor_arg(schema, args, kMatmulLeft);
      const at::Tensor* b = tensor_arg(schema, args, kMatmulRight);
      return a == nullptr || b == nullptr ? 0 : matmul_flops(*a, *b);
    }
    case Cost::kConv:
    case Cost::kNarrowConv: {
      const at::Tensor* input = tensor_arg(schema, args, {"input", "self"});
      const at::Tensor* weight = tensor_arg(schema, args, {"weight"});
      if (input == nullptr || weight == nullptr || weight->dim() < 3 || input->dim() < weight->dim() - 1) {
        return 0;
      }
      const size_t spatial = static_cast<size_t>(weight->dim() - 2);
      const c10::IValue* flag = arg(schema, args, "transposed");
      const bool transposed = (flag != nullptr && flag->isBool() && flag->toBool()) ||
                              schema.name().find("transpose") != std::string::npos;
      const auto sizes = input->sizes();
      if (schema.name() == "aten::conv_tbc") {  // input (time, batch, in), weight (width, in, out)
        if (input->dim() != 3) {
          return 0;
        }
        const c10::IValue* pad = arg(schema, args, "pad");
        const int64_t padding = pad != nullptr && pad->isInt() ? pad->toInt() : 0;
        return 2.0 * window_out(sizes[0], weight->size(0), 1, padding, 1) * static_cast<double>(sizes[1]) *
               static_cast<double>(weight->numel());
      }
      const size_t first = sizes.size() - spatial;
      const double batch = product(sizes.slice(0, first)) / static_cast<double>(std::max<int64_t>(sizes[first - 1], 1));
      double positions = 1;  // output positions (input positions when transposed)
      if (transposed) {
        positions = product(sizes, first);
      } else {
        const auto stride = int_list(schema, args, "stride");
        const auto padding = int_list(schema, args, "padding");
        const auto dilation = int_list(schema, args, "dilation");
        for (size_t i = 0; i < spatial; ++i) {
          positions *= window_out(sizes[first + i], weight->size(static_cast<int64_t>(2 + i)), at_or(stride, i, 1),
                                  at_or(padding, i, 0), at_or(dilation, i, 1));
        }
      }
      const double flops = 2.0 * batch * positions * static_cast<double>(weight->numel());
      // a narrow convolution's unfolded input per group and sample (positions x window x channels)
      const double unfolded =
          positions * static_cast<double>(weight->numel()) / static_cast<double>(std::max<int64_t>(weight->size(0), 1));
      return kind == Cost::kNarrowConv && unfolded > kNarrowLargeElements ? flops * kNarrowLargeSlowdown : flops;
    }
    case Cost::kAttention: {  // q (..., L, E), k (..., S, E), v (..., S, Ev)
      const at::Tensor* q = tensor_arg(schema, args, {"query", "q"});
      const at::Tensor* k = tensor_arg(schema, args, {"key", "k"});
      const at::Tensor* v = tensor_arg(schema, args, {"value", "v"});
      if (q == nullptr || k == nullptr || v == nullptr || q->dim() < 2 || k->dim() < 2 || v->dim() < 1) {
        return 0;
      }
      // The layout differs between kernels ((B, H, L, E) or (B, L, H, E)): price the larger.
      const double rows = static_cast<double>(q->numel()) / static_cast<double>(std::max<int64_t>(q->size(-1), 1));
      const double keys = static_cast<double>(std::max(k->size(-2), k->dim() >= 3 ? k->size(-3) : int64_t{1}));
      return 2.0 * rows * keys * static_cast<double>(q->size(-1) + v->size(-1));
    }
    case Cost::kCubic: {  // A (..., m, n): ~ batch * m * n * min(m, n)
      const at::Tensor* a = tensor_arg(schema, args, {"self", "A", "input", "LU", "B"});
      if (a == nullptr || a->dim() < 2) {
        return 0;
      }
      return static_cast<double>(a->numel()) * static_cast<double>(std::min(a->size(-1), a->size(-2)));
    }
    case Cost::kPool: {  // every output position reads its window (elements read)
      const at::Tensor* input = tensor_arg(schema, args, {"self", "input"});
      const auto kernel = int_list(schema, args, "kernel_size");
      if (input == nullptr || kernel.empty()) {
        return 0;
      }
      const size_t spatial = std::min(kernel.size(), static_cast<size_t>(input->dim()));
      const auto sizes = input->sizes();
      const size_t first = sizes.size() - spatial;
      const auto stride = int_list(schema, args, "stride");
      const auto padding = int_list(schema, args, "padding");
      const auto dilation = int_list(schema, args, "dilation");
      const auto output_size = int_list(schema, args, "output_size");  // fractional pooling: given
      double positions = product(sizes.slice(0, first));
      for (size_t i = 0; i < spatial; ++i) {
        const int64_t k = at_or(kernel, i, 1);
        if (!output_size.empty()) {
          positions *= static_cast<double>(at_or(output_size, i, 1)) * static_cast<double>(k);
          continue;
        }
        positions *= window_out(sizes[first + i], k, at_or(stride, i, k), at_or(padding, i, 0), at_or(dilation, i, 1)) *
                     static_cast<double>(k);
      }
      return positions;
    }
    case Cost::kPairwise: {  // x1 (..., P, M), x2 (..., R, M): every pair's distance
      const at::Tensor* a = tensor_arg(schema, args, {"x1"});
      const at::Tensor* b = tensor_arg(schema, args, {"x2"});
      if (a == nullptr || b == nullptr || b->dim() < 2) {
        return 0;
      }
      return 2.0 * static_cast<double>(a->numel()) * static_cast<double>(b->size(-2));
    }
    case Cost::kChain: {  // a product chain's order search: cubic in the number of operands (elements)
      const c10::IValue* list = arg(schema, args, "tensors");
      if (list == nullptr || !list->isList()) {
        return 0;
      }
      const double n = static_cast<double>(list->toListRef().size());
      return n * n * n;
    }
    case Cost::kRecurrent: {  // every step (row of the input) multiplies by every weight, plus a fixed cost
      const at::Tensor* input = tensor_arg(schema, args, {"input", "data"});
      if (input == nullptr || input->dim() < 1) {
        return 0;
      }
      double weights = 0;
      for (size_t i = 0; i < args.size() && i < schema.arguments().size(); ++i) {
        const c10::IValue& value = args[i];
        if (value.isTensorList()) {
          for (const at::Tensor& t : value.toTensorVector()) {
            weights += static_cast<double>(t.numel());
          }
        } else if (value.isTensor() && schema.arguments()[i].name().rfind("weight", 0) == 0) {
          weights += static_cast<double>(value.toTensor().numel());
        }
      }
      const double rows = static_cast<double>(input->numel()) / static_cast<double>(std::max<int64_t>(input->size(-1), 1));
      return rows * (2.0 * weights + kStepFlops);
    }
    case Cost::kNLogN: {  // elements x log2(the length along `dim`, or of the dims transformed, or all)
      const at::Tensor* t = tensor_arg(schema, args, {"self", "input"});
      if (t == nullptr || t->numel() < 2) {
        return 0;
      }
      const double numel = static_cast<double>(t->numel());
      const int64_t rank = t->dim();
      auto length = [&](int64_t d) -> double {
        d = d < 0 ? d + rank : d;
        return d >= 0 && d < rank ? static_cast<double>(t->size(d)) : numel;
      };
      double n = numel;
      const c10::IValue* dim = arg(schema, args, "dim");
      if (dim != nullptr && dim->isInt()) {
        n = length(dim->toInt());
      } else if (dim != nullptr && dim->isIntList() && !dim->toIntVector().empty()) {
        n = 1;
        for (int64_t d : dim->toIntVector()) {
          n *= length(d);
        }
        n = std::min(n, numel);
      }
      const double steps = numel * std::log2(std::max(n, 2.0));
      const double bytes = numel * static_cast<double>(t->element_size());
      return t->element_size() >= 8 && bytes > kLargeSortBytes ? steps * kLargeSortSlowdown : steps;
    }
    case Cost::kLinear: {  // x (..., k) by W (m, k, ...): 2 * numel(x) * m
      const at::Tensor* x = tensor_arg(schema, args, {"input", "self", "inp"});
      const at::Tensor* w = tensor_arg(schema, args, {"weight", "coefficients", "mat2", "packed_weights"});
      if (x == nullptr || w == nullptr) {
        return 0;
      }
      const c10::IValue* out_features = arg(schema, args, "out_features");  // packed weights
      const double rows = out_features != nullptr && out_features->isInt() ? static_cast<double>(out_features->toInt())
                          : w->dim() >= 2                                ? static_cast<double>(w->size(0))
                                                                           : 1.0;
      return 2.0 * static_cast<double>(x->numel()) * rows;
    }
    case Cost::kTrilinear: {  // 2 x the index space i1, i2, i3 span, each unsqueezed at its expand dims
      std::vector<int64_t> space;
      const char* names[3][2] = {{"i1", "expand1"}, {"i2", "expand2"}, {"i3", "expand3"}};
      for (const auto& name : names) {
        const at::Tensor* t = tensor_arg(schema, args, {name[0]});
        if (t == nullptr) {
          return 0;
        }
        std::vector<int64_t> sizes = t->sizes().vec();
        std::vector<int64_t> expand = int_list(schema, args, name[1]);
        std::sort(expand.begin(), expand.end());
        for (int64_t d : expand) {
          if (d >= 0 && static_cast<size_t>(d) <= sizes.size()) {
            sizes.insert(sizes.begin() + d, 1);
          }
        }
        space.resize(std::max(space.size(), sizes.size()), 1);
        for (size_t i = 0; i < sizes.size(); ++i) {
          space[i] = std::max(space[i], sizes[i]);
        }
      }
      return 2.0 * product(space);
    }
    case Cost::kEncoder: {  // 2 * rows * (projection and feed-forward weights) + attention 4 * rows * L * E
      const at::Tensor* src = tensor_arg(schema, args, {"src"});
      if (src == nullptr || src->dim() < 2 || src->is_nested()) {
        return 0;
      }
      const double width = static_cast<double>(std::max<int64_t>(src->size(-1), 1));
      const double rows = static_cast<double>(src->numel()) / width;
      double weights = 0;
      for (const char* name : {"qkv_weight", "proj_weight", "ffn_weight_1", "ffn_weight_2"}) {
        const at::Tensor* w = tensor_arg(schema, args, {name});
        weights += w == nullptr ? 0 : static_cast<double>(w->numel());
      }
      return 2.0 * rows * weights + 4.0 * rows * static_cast<double>(src->size(-2)) * width;
    }
    case Cost::kBag: {  // every index reads a row of the weight
      const at::Tensor* w = tensor_arg(schema, args, {"weight"});
      const at::Tensor* indices = tensor_arg(schema, args, {"indices"});
      if (w == nullptr || indices == nullptr || w->dim() < 1) {
        return 0;
      }
      return static_cast<double>(indices->numel()) * static_cast<double>(w->size(-1));
    }
    case Cost::kRowPairs:
    case Cost::kLabelPairs: {  // every pair of rows; every (target, class) pair of a row
      const at::Tensor* x = tensor_arg(schema, args, {"self"});
      if (x == nullptr || x->dim() < 1) {
        return 0;
      }
      if (kind == Cost::kLabelPairs) {
        return static_cast<double>(x->numel()) * static_cast<double>(x->size(-1));
      }
      return x->dim() < 2 ? 0 : static_cast<double>(x->numel()) * static_cast<double>(x->size(-2)) / 2;
    }
    case Cost::kOutputs: {  // one tensor per piece (see op_work._outputs_cost)
      const at::Tensor* t = tensor_arg(schema, args, {"self"});
      if (t == nullptr || t->dim() < 1) {
        return 0;
      }
      const c10::IValue* dim = arg(schema, args, "dim");
      int64_t d = dim != nullptr && dim->isInt() ? dim->toInt() : 0;
      d = d < 0 ? d + t->dim() : d;
      const int64_t length = d >= 0 && d < t->dim() ? t->size(d) : 1;
      const c10::IValue* split_size = arg(schema, args, "split_size");
      const c10::IValue* chunks = arg(schema, args, "chunks");
      const c10::IValue* sections = arg(schema, args, "sections");
      const c10::IValue* indices = arg(schema, args, "indices");
      if (split_size != nullptr && split_size->isInt()) {
        const int64_t size = std::max<int64_t>(split_size->toInt(), 1);
        return static_cast<double>(std::max<int64_t>((length + size - 1) / size, 1));
      }
      if (chunks != nullptr && chunks->isInt()) {
        return static_cast<double>(std::min(chunks->toInt(), std::max<int64_t>(length, 1)));
      }
      if (sections != nullptr && sections->isInt()) {
        return static_cast<double>(sections->toInt());
      }
      if (split_size != nullptr && split_size->isIntList()) {
        return static_cast<double>(split_size->toIntVector().size());
      }
      if (indices != nullptr && indices->isIntList()) {
        return static_cast<double>(indices->toIntVector().size() + 1);
      }
      if (arg(schema, args, "tensor_indices_or_sections") != nullptr) {
        return 0;  // decomposes into tensor_split by sections or by indices, priced there
      }
      return static_cast<double>(length);  // unbind
    }
    case Cost::kView:
    case Cost::kNone:
      return 0;
  }
  return 0;
}

// The price an op of the table's `kind` is charged: a convolution with a narrow channel block is
// kNarrowConv (op_work.priced_kind).
inline Cost priced_kind(Cost kind, const c10::OperatorHandle& op, c10::ArrayRef<c10::IValue> args) {
  if (kind != Cost::kConv) {
    return kind;
  }
  const auto& schema = op.schema();
  const at::Tensor* weight = tensor_arg(schema, args, {"weight"});
  if (weight == nullptr || weight->dim() < 3) {
    return kind;
  }
  int64_t block = 0;
  if (schema.name().find("depthwise") != std::string::npos) {
    block = 1;
  } else if (schema.name() == "aten::conv_tbc") {  // weight (width, in, out)
    block = weight->size(1) * weight->size(2);
  } else {  // (out, in / groups, ...), or (in, out / groups, ...) when transposed: the same product
    const c10::IValue* groups = arg(schema, args, "groups");
    const int64_t g = groups != nullptr && groups->isInt() ? std::max<int64_t>(groups->toInt(), 1) : 1;
    block = weight->size(0) * weight->size(1) / g;
  }
  return block < kNarrowChannels ? Cost::kNarrowConv : kind;
}

// The first tensor argument's device and dtype (what the kernel is chosen by).
inline std::pair<bool, c10::ScalarType> placement(c10::ArrayRef<c10::IValue> args) {
  for (const c10::IValue& value : args) {
    if (value.isTensor() && value.toTensor().defined()) {
      return {value.toTensor().device().is_cpu(), value.toTensor().scalar_type()};
    }
  }
  return {true, c10::ScalarType::Float};
}

// An op's name without its namespace ("aten::mm" -> "mm").
inline std::string short_name(std::string_view full) {
  const auto sep = full.find("::");
  return std::string(sep == std::string_view::npos ? full : full.substr(sep + 2));
}

inline std::string fixed(double value, int digits) {
  char buffer[64];
  std::snprintf(buffer, sizeof(buffer), "%.*f", digits, value);
  return buffer;
}

// The refusal's text when `work` (flops, or elements for kView) cannot finish in time; empty if it can.
inline std::string over_budget(const Budget& budget, const Rates& rates, Cost kind, std::string_view op, double work,
                               std::pair<bool, c10::ScalarType> where) {
  if (work <= 0) {
    return {};
  }
  const bool cpu = where.first;
  const bool elements = in_elements(kind);
  const bool steps = kind == Cost::kNLogN;
  double rate = kind == Cost::kOutputs ? rates.cpu_tensors
                : steps      ? (cpu ? rates.cpu_steps : rates.device_steps)
                : elements ? (cpu ? rates.cpu_elements : rates.device_elements)
                           : (cpu ? rates.cpu_flops : rates.device_flops);
  if (cpu && !elements && !steps && kind != Cost::kOutputs) {  // the measured rate of this dtype; the slowest measured for the others
    const auto index = static_cast<size_t>(where.second);
    const double measured = index < rates.cpu_flops_by_dtype.size() ? rates.cpu_flops_by_dtype[index] : 0;
    if (measured > 0) {
      rate = measured;
    } else {
      for (double r : rates.cpu_flops_by_dtype) {
        rate = r > 0 ? std::min(rate, r) : rate;
      }
    }
    if (kind == Cost::kCubic && rates.cpu_cubic > 0) {  // factorisations run far below a product's rate
      rate = std::min(rate, rates.cpu_cubic);
    }
    if (kind == Cost::kNarrowConv && rates.cpu_narrow_conv > 0) {  // few channels per group
      rate = std::min(rate, rates.cpu_narrow_conv);
    }
  }
  if (rate <= 0) {
    return {};
  }
  const double left = std::max(0.0, budget.limit_at - now_s());
  if (work <= rate * left) {
    return {};
  }
  if (kind == Cost::kOutputs) {
    return short_name(op) + " makes ~" + fixed(work / 1e6, 1) + " M tensors, more than the " + fixed(left, 1) +
           " s this request has left allow at this replica's ~" + fixed(rate / 1e6, 2) +
           " M tensors/s; split into fewer pieces (index or slice the ones you need)";
  }
  if (steps) {
    return short_name(op) + " needs ~" + fixed(work / 1e9, 1) + " G n log n steps, more than the " + fixed(left, 1) +
           " s this request has left allow at this replica's ~" + fixed(rate / 1e9, 2) +
           " G steps/s; sort or transform fewer elements (e.g. a slice, or topk with a smaller input)";
  }
  if (elements && kind != Cost::kView) {
    return short_name(op) + " reads ~" + fixed(work / 1e9, 1) + " G elements, more than the " + fixed(left, 1) +
           " s this request has left allow at this replica's ~" + fixed(rate / 1e9, 1) +
           " G elements/s; use smaller operands";
  }
  if (elements) {
    return short_name(op) + " makes a view of ~" + fixed(work / 1e9, 1) +
           " G elements over far less memory; reading it needs more than the " + fixed(left, 1) +
           " s this request has left at this replica's ~" + fixed(rate / 1e9, 1) +
           " G elements/s (materialise a smaller tensor instead)";
  }
  return short_name(op) + " needs ~" + fixed(work / 1e9, 1) + " GFLOP, more than the " + fixed(left, 1) +
         " s this request has left allow at this replica's ~" + fixed(rate / 1e9, 1) +
         " GFLOP/s; use smaller operands";
}

}  // namespace work_bounds
