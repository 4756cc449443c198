// The checks every kernel of the write guard's key makes (included by write_guard.cpp; used by its
// boxed kernel and by the typed kernels of typed_kernels.h, so both apply the same rules).
//
//   * server memory: a table of sorted, merged byte ranges of storages, one per active guard; a
//     thread reads the published union through a per-thread copy refreshed when it changes;
//   * refusals: a write into server memory, an op over the request's time budget, a stopped
//     request, each raised as the Python class the sandbox names;
//   * zeroing: what an allocation hands out.

#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>

#include "work_bounds.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace write_guard {

// A functionality key above autograd that nothing else in torch registers kernels for; it is
// dispatched only while in the thread's include set.
constexpr c10::DispatchKey kKey = c10::DispatchKey::TESTING_ONLY_GenericMode;
// What a kernel of the key redispatches to: everything below it.
inline const c10::DispatchKeySet kBelow(c10::DispatchKeySet::FULL_AFTER, kKey);

// What the guard does for one op, read off its schema (write_guard.cpp's rule_of, which mirrors
// dispatch_guard.op_rule).
struct Rule {
  std::vector<size_t> written;  // schema positions of written arguments
  std::vector<size_t> stats;    // running statistics updated without the schema saying so
  int64_t training = -1;        // the flag that turns those updates on (-1: none, always on)
  bool allocates = false;       // returns uninitialised memory
  bool grows = false;           // may grow its first argument's storage
  work_bounds::Cost cost = work_bounds::Cost::kNone;  // priced before (or, views, after) it runs
  bool plain() const {
    return written.empty() && stats.empty() && !allocates && !grows && cost == work_bounds::Cost::kNone;
  }
};

// --- server memory ---------------------------------------------------------------------------

struct Ranges {
  std::vector<uintptr_t> starts;
  std::vector<uintptr_t> ends;
};

inline std::mutex g_tables_mutex;
inline std::map<int64_t, Ranges> g_tables;  // by token, one per active guard
inline int64_t g_next_token = 1;
inline std::shared_ptr<const Ranges> g_merged = std::make_shared<const Ranges>();  // union of g_tables
inline std::atomic<uint64_t> g_published{0};  // bumped after each new g_merged

inline void publish_locked() {
  std::vector<std::pair<uintptr_t, uintptr_t>> all;
  for (const auto& entry : g_tables) {
    for (size_t i = 0; i < entry.second.starts.size(); ++i) {
      all.emplace_back(entry.second.starts[i], entry.second.ends[i]);
    }
  }
  std::sort(all.begin(), all.end());
  auto merged = std::make_shared<Ranges>();
  for (const auto& r : all) {
    if (!merged->starts.empty() && r.first <= merged->ends.back()) {
      merged->ends.back() = std::max(merged->ends.back(), r.second);
    } else {
      merged->starts.push_back(r.first);
      merged->ends.push_back(r.second);
    }
  }
  std::atomic_store(&g_merged, std::shared_ptr<const Ranges>(std::move(merged)));
  g_published.fetch_add(1, std::memory_order_release);
}

// This thread's copy of the published union. A guarded op reads it with one atomic load; the
// shared pointer (a lock in the standard library) is read again only after a table was added or
// removed. Loaded after the counter, the copy is never older than the counter says.
struct ServerView {
  uint64_t seen = ~uint64_t{0};
  std::shared_ptr<const Ranges> ranges;
};
inline thread_local ServerView t_server;

inline const Ranges& server_ranges() {
  const uint64_t now = g_published.load(std::memory_order_acquire);
  ServerView& view = t_server;
  if (view.seen != now) {
    view.ranges = std::atomic_load(&g_merged);
    view.seen = now;
  }
  return *view.ranges;
}

// The storage's byte range, or {0, 0} when it has no memory of its own (sparse, meta, wrappers).
inline std::pair<uintptr_t, uintptr_t> storage_span(const at::Tensor& tensor) {
  if (!tensor.defined()) {
    return {0, 0};
  }
  const c10::Storage& storage = tensor.unsafeGetTensorImpl()->unsafe_storage();
  if (!storage) {
    return {0, 0};
  }
  const auto start = reinterpret_cast<uintptr_t>(storage.data_ptr().get());
  return start ? std::make_pair(start, start + storage.nbytes()) : std::make_pair(uintptr_t{0}, uintptr_t{0});
}

inline bool owns(const Ranges& server, const at::Tensor& tensor) {
  const auto span = storage_span(tensor);
  if (span.first == 0) {
    return false;
  }
  // the last server range starting before this storage ends must end after it starts
  const auto it = std::lower_bound(server.starts.begin(), server.starts.end(), span.second);
  if (it == server.starts.begin()) {
    return false;
  }
  const auto i = static_cast<size_t>(it - server.starts.begin()) - 1;
  return server.ends[i] > span.first;
}

inline size_t storage_bytes(const at::Tensor& tensor) {
  if (!tensor.defined()) {
    return 0;
  }
  const c10::Storage& storage = tensor.unsafeGetTensorImpl()->unsafe_storage();
  return storage ? storage.nbytes() : 0;
}

// --- refusals ----------------------------------------------------------------------------------

inline PyObject* g_error_type = nullptr;  // model_runtime.sandbox.errors.ModelTampering (a new reference)
inline std::vector<PyObject*> g_stop_types;  // what a stop raises, by Budget::cancel (new references)
inline PyObject* g_limit_type = nullptr;  // errors.LimitExceeded: an op over the request's budget
inline std::atomic<int64_t> g_refused{0};
inline std::atomic<int64_t> g_zeroed{0};
inline std::atomic<int64_t> g_stops{0};
inline std::atomic<int64_t> g_over_budget{0};

// Surfaces in Python as ModelTampering (torch translates PyTorchError by its python_type()).
struct Refusal : public torch::PyTorchError {
  using torch::PyTorchError::PyTorchError;
  PyObject* python_type() override { return g_error_type != nullptr ? g_error_type : PyExc_RuntimeError; }
};

struct Stopped : public torch::PyTorchError {
  Stopped(std::string message, size_t cancel) : torch::PyTorchError(std::move(message)), cancel_(cancel) {}
  PyObject* python_type() override { return cancel_ < g_stop_types.size() ? g_stop_types[cancel_] : PyExc_RuntimeError; }

 private:
  size_t cancel_;
};

struct OverBudget : public torch::PyTorchError {
  using torch::PyTorchError::PyTorchError;
  PyObject* python_type() override { return g_limit_type != nullptr ? g_limit_type : PyExc_RuntimeError; }
};

[[noreturn]] inline void refuse(std::string_view op) {
  g_refused.fetch_add(1, std::memory_order_relaxed);
  throw Refusal(work_bounds::short_name(op) +
                " would write into memory of the served model (a weight, buffer or a view of one); work on a "
                "copy: `x = tensor.clone()`");
}

// Before any guarded op of a bound request: raise its stop once it was stopped.
inline void check_stop(std::string_view op) {
  const work_bounds::Budget* budget = work_bounds::t_budget.get();
  if (budget != nullptr && budget->stopped.load(std::memory_order_relaxed)) {
    g_stops.fetch_add(1, std::memory_order_relaxed);
    throw Stopped("the request ran past its time limit and was stopped (at " + work_bounds::short_name(op) + ")",
                  budget->cancel);
  }
}

// Refuse `work` (flops, or elements for kView) that cannot finish in the bound request's time left.
inline void check_price(work_bounds::Cost kind, std::string_view op, double work, std::pair<bool, c10::ScalarType> where) {
  const work_bounds::Budget* budget = work_bounds::t_budget.get();
  if (budget == nullptr) {
    return;
  }
  const std::string refusal = work_bounds::over_budget(*budget, work_bounds::g_rates, kind, op, work, where);
  if (!refusal.empty()) {
    g_over_budget.fetch_add(1, std::memory_order_relaxed);
    throw OverBudget(refusal);
  }
}

// After a view op: the logical size of what it returned, which memory does not bound.
inline void check_view(std::string_view op, const at::Tensor& view) {
  if (!view.defined() || work_bounds::t_budget.get() == nullptr) {
    return;
  }
  const double elements = static_cast<double>(view.numel());
  if (elements * static_cast<double>(view.element_size()) <= static_cast<double>(storage_bytes(view))) {
    return;  // a view within its memory: reading it is bounded by what memory allows
  }
  check_price(work_bounds::Cost::kView, op, elements, {view.device().is_cpu(), view.scalar_type()});
}

// --- zeroing -----------------------------------------------------------------------------------

// Zero bytes [from, end) of the storage, below autograd and below this key.
inline void zero_storage(const c10::Storage& storage, size_t from) {
  if (!storage || storage.nbytes() <= from || storage.data_ptr().get() == nullptr) {
    return;
  }
  const size_t nbytes = storage.nbytes();
  g_zeroed.fetch_add(1, std::memory_order_relaxed);
  if (storage.device_type() == c10::DeviceType::CPU) {
    std::memset(static_cast<char*>(storage.mutable_data()) + from, 0, nbytes - from);
    return;
  }
  c10::impl::ExcludeDispatchKeyGuard below(c10::autograd_dispatch_keyset_with_ADInplaceOrView.add(kKey));
  at::Tensor raw = at::empty({0}, at::TensorOptions().dtype(at::kByte).device(storage.device()));
  raw.set_(storage, 0, {static_cast<int64_t>(nbytes)}, {1});
  raw.narrow(0, static_cast<int64_t>(from), static_cast<int64_t>(nbytes - from)).zero_();
}

inline void zero_allocation(const at::Tensor& tensor) {
  if (tensor.defined()) {
    zero_storage(tensor.unsafeGetTensorImpl()->unsafe_storage(), 0);
  }
}

}  // namespace write_guard
