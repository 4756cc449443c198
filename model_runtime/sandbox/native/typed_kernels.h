// Typed (unboxed) kernels of the write guard's key for the ops a model's forward calls most
// (included by write_guard.cpp).
//
// The guard's boxed kernel serves every op: it boxes the arguments into a stack of IValues, checks
// them, and redispatches boxed, which unboxes them again for the kernel below. For a small op
// (an `as_strided` that `transpose` calls, an `empty` for a product's result, a `copy_`) that
// round trip costs more than the op. The kernels here take the op's own C++ arguments and
// redispatch them unboxed. Each applies the rule that write_guard.cpp's `rule_of` derives from the
// op's schema, the same rule the boxed kernel applies:
//   * Checked: the request's stop; a write into server memory refused before the op runs (the
//     written positions come from the rule); an allocation zeroed;
//   * Product: the stop; a matrix product priced against the time left (operands picked as
//     work_bounds::cost_of picks them);
//   * View: the stop; a view larger than its memory priced after it is made.
// A kernel is registered for an op only when `configure` finds that it can apply the op's rule in
// full (every written position is a tensor argument, no running statistics, ...); any other op,
// or an op whose rule differs from what its kernel here expects, gets the boxed kernel.

#pragma once

#include <ATen/Operators.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "guard_checks.h"

#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>

namespace write_guard::typed {

template <class T>
using Bare = std::remove_cv_t<std::remove_reference_t<T>>;

template <class T>
constexpr bool kTensor = std::is_same_v<Bare<T>, at::Tensor>;

// The argument types whose written-ness a typed kernel checks: a tensor, a list of tensors, an
// optional tensor.
template <class T>
constexpr bool kCheckable =
    kTensor<T> || std::is_same_v<Bare<T>, at::TensorList> || std::is_same_v<Bare<T>, std::optional<at::Tensor>>;

template <class... A>
constexpr uint64_t checkable_mask() {
  uint64_t mask = 0;
  uint64_t bit = 1;
  ((mask |= kCheckable<A> ? bit : 0, bit <<= 1), ...);
  return mask;
}

template <class T>
bool owned(const Ranges& server, const T& value) {
  if constexpr (std::is_same_v<T, at::Tensor>) {
    return owns(server, value);
  } else if constexpr (std::is_same_v<T, at::TensorList>) {
    for (const at::Tensor& tensor : value) {
      if (owns(server, tensor)) {
        return true;
      }
    }
    return false;
  } else if constexpr (std::is_same_v<T, std::optional<at::Tensor>>) {
    return value.has_value() && owns(server, *value);
  } else {
    return false;
  }
}

// The first defined tensor argument's device and dtype, as work_bounds::placement reads a stack.
template <class T>
const at::Tensor* defined_tensor(const T& value) {
  if constexpr (std::is_same_v<T, at::Tensor>) {
    return value.defined() ? &value : nullptr;
  } else if constexpr (std::is_same_v<T, std::optional<at::Tensor>>) {
    return value.has_value() && value->defined() ? &*value : nullptr;
  } else {
    return nullptr;
  }
}

template <class... A>
std::pair<bool, c10::ScalarType> placement_of(const A&... args) {
  const at::Tensor* first = nullptr;
  ((first = first != nullptr ? first : defined_tensor(args)), ...);
  if (first == nullptr) {
    return {true, c10::ScalarType::Float};
  }
  return {first->device().is_cpu(), first->scalar_type()};
}

inline bool no_checks_but(const Rule& rule, work_bounds::Cost cost) {
  return rule.written.empty() && rule.stats.empty() && !rule.allocates && !rule.grows && rule.cost == cost;
}

// Ops that write tensor arguments or allocate.
template <class Op, class Sig = typename Op::schema>
struct Checked;

template <class Op, class R, class... A>
struct Checked<Op, R(A...)> {
  static inline uint64_t written = 0;  // bit i: argument i is written
  static inline bool allocates = false;

  static bool configure(const Rule& rule, const c10::FunctionSchema& /*schema*/) {
    if (!rule.stats.empty() || rule.grows || rule.cost != work_bounds::Cost::kNone || sizeof...(A) > 64 ||
        (rule.allocates && !std::is_same_v<R, at::Tensor>)) {
      return false;
    }
    uint64_t mask = 0;
    for (size_t position : rule.written) {
      if (position >= sizeof...(A)) {
        return false;
      }
      mask |= uint64_t{1} << position;
    }
    if ((mask & ~checkable_mask<A...>()) != 0) {
      return false;
    }
    written = mask;
    allocates = rule.allocates;
    return true;
  }

  static R call(c10::DispatchKeySet ks, A... args) {
    check_stop(Op::name);
    if (written != 0) {
      refuse_if_written(std::index_sequence_for<A...>{}, args...);
    }
    if constexpr (std::is_same_v<R, at::Tensor>) {
      if (allocates) {
        at::Tensor out = Op::redispatch(ks & kBelow, std::forward<A>(args)...);
        zero_allocation(out);
        return out;
      }
    }
    return Op::redispatch(ks & kBelow, std::forward<A>(args)...);
  }

 private:
  template <size_t... I>
  static void refuse_if_written(std::index_sequence<I...> /*positions*/, const Bare<A>&... args) {
    const Ranges& server = server_ranges();
    if (!server.starts.empty() && ((((written >> I) & 1) != 0 && owned(server, args)) || ...)) {
      refuse(Op::name);
    }
  }
};

// The position of the first of `names` in the schema (how work_bounds::tensor_arg looks).
inline size_t position_of(const c10::FunctionSchema& schema, std::initializer_list<const char*> names) {
  for (const char* name : names) {
    const auto index = schema.argumentIndexWithName(name);
    if (index.has_value()) {
      return *index;
    }
  }
  return ~size_t{0};
}

// Matrix products: operand `Left` (n x k, batched) times operand `Right` (k x m).
template <class Op, size_t Left, size_t Right, class Sig = typename Op::schema>
struct Product;

template <class Op, size_t Left, size_t Right, class R, class... A>
struct Product<Op, Left, Right, R(A...)> {
  using Args = std::tuple<A...>;
  static_assert(kTensor<std::tuple_element_t<Left, Args>> && kTensor<std::tuple_element_t<Right, Args>>);

  static bool configure(const Rule& rule, const c10::FunctionSchema& schema) {
    return no_checks_but(rule, work_bounds::Cost::kMatmul) && position_of(schema, work_bounds::kMatmulLeft) == Left &&
           position_of(schema, work_bounds::kMatmulRight) == Right;
  }

  static R call(c10::DispatchKeySet ks, A... args) {
    check_stop(Op::name);
    if (work_bounds::t_budget.get() != nullptr) {
      const at::Tensor& a = std::get<Left>(std::forward_as_tuple(args...));
      const at::Tensor& b = std::get<Right>(std::forward_as_tuple(args...));
      if (a.defined() && b.defined()) {
        check_price(work_bounds::Cost::kMatmul, Op::name, work_bounds::matmul_flops(a, b), placement_of(args...));
      }
    }
    return Op::redispatch(ks & kBelow, std::forward<A>(args)...);
  }
};

// Views whose logical size memory may not bound, priced after they are made.
template <class Op, class Sig = typename Op::schema>
struct View;

template <class Op, class... A>
struct View<Op, at::Tensor(A...)> {
  static bool configure(const Rule& rule, const c10::FunctionSchema& /*schema*/) {
    return no_checks_but(rule, work_bounds::Cost::kView);
  }

  static at::Tensor call(c10::DispatchKeySet ks, A... args) {
    check_stop(Op::name);
    at::Tensor view = Op::redispatch(ks & kBelow, std::forward<A>(args)...);
    check_view(Op::name, view);
    return view;
  }
};

struct Entry {
  bool (*configure)(const Rule&, const c10::FunctionSchema&);
  c10::KernelFunction (*kernel)();
  c10::impl::CppSignature signature;
};

template <class Op, class K>
std::pair<const c10::OperatorName, Entry> entry() {
  return {c10::OperatorName(Op::name, Op::overload_name),
          Entry{&K::configure, [] { return c10::KernelFunction::makeFromUnboxedFunction(TORCH_FN(K::call)); },
                c10::impl::CppSignature::make<decltype(K::call)>()}};
}

#define NDIF_CHECKED(op) entry<at::_ops::op, Checked<at::_ops::op>>()
#define NDIF_PRODUCT(op, left, right) entry<at::_ops::op, Product<at::_ops::op, left, right>>()
#define NDIF_VIEW(op) entry<at::_ops::op, View<at::_ops::op>>()

// The ops with a typed kernel: those a transformer's forward, nnsight's hooks and a request's
// usual in-place edits call most.
inline const std::unordered_map<c10::OperatorName, Entry>& kernels() {
  static const auto* table = new std::unordered_map<c10::OperatorName, Entry>{
      // allocations
      NDIF_CHECKED(empty_memory_format), NDIF_CHECKED(empty_strided), NDIF_CHECKED(empty_like),
      NDIF_CHECKED(new_empty), NDIF_CHECKED(new_empty_strided), NDIF_CHECKED(empty_permuted),
      // in place
      NDIF_CHECKED(copy_), NDIF_CHECKED(fill__Scalar), NDIF_CHECKED(fill__Tensor), NDIF_CHECKED(zero_),
      NDIF_CHECKED(detach_), NDIF_CHECKED(add__Tensor), NDIF_CHECKED(add__Scalar), NDIF_CHECKED(sub__Tensor),
      NDIF_CHECKED(sub__Scalar), NDIF_CHECKED(mul__Tensor), NDIF_CHECKED(mul__Scalar), NDIF_CHECKED(div__Tensor),
      NDIF_CHECKED(div__Scalar), NDIF_CHECKED(div__Tensor_mode), NDIF_CHECKED(masked_fill__Scalar),
      NDIF_CHECKED(masked_fill__Tensor), NDIF_CHECKED(clamp_), NDIF_CHECKED(index_put_), NDIF_CHECKED(addcmul_),
      NDIF_CHECKED(addcdiv_), NDIF_CHECKED(exp_), NDIF_CHECKED(neg_), NDIF_CHECKED(relu_),
      // out= variants that composite ops call
      NDIF_CHECKED(sum_IntList_out), NDIF_CHECKED(mean_out), NDIF_CHECKED(arange_start_out),
      NDIF_CHECKED(arange_out), NDIF_CHECKED(cat_out), NDIF_CHECKED(add_out), NDIF_CHECKED(mul_out),
      NDIF_CHECKED(index_select_out),
      // priced products
      NDIF_PRODUCT(mm, 0, 1), NDIF_PRODUCT(bmm, 0, 1), NDIF_PRODUCT(addmm, 1, 2), NDIF_PRODUCT(baddbmm, 1, 2),
      NDIF_PRODUCT(_addmm_activation, 1, 2),
      // priced views
      NDIF_VIEW(as_strided), NDIF_VIEW(expand), NDIF_VIEW(unfold), NDIF_VIEW(_reshape_alias),
  };
  return *table;
}

#undef NDIF_CHECKED
#undef NDIF_PRODUCT
#undef NDIF_VIEW

}  // namespace write_guard::typed
