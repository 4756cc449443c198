// The dispatch-level write guard as dispatcher kernels (see model_runtime/sandbox/native_guard.py).
//
// While a request runs, its thread has the guard's dispatch key in its thread-local include set.
// The key sits above autograd, so every dispatcher call the thread makes (user code, nnsight's
// hooks, the model's forward, composite decompositions, calls kernels make, the backward pass,
// which inherits the thread's dispatch keys) reaches this key first:
//   * ops with nothing to check (no written argument, no allocation, no price) have a per-op
//     fallthrough kernel: the dispatcher skips the key at no cost;
//   * ops that write an argument, update running statistics or hand out memory have a kernel that
//     refuses a write into server memory before anything runs and zeroes what an allocation
//     returns, then redispatches below the key;
//   * heavy ops (priced by work_bounds.h) also have a kernel: it refuses one that cannot finish
//     before the request's limit; every kernel of the key ends the request once it was stopped;
//   * the kernel is a typed one (typed_kernels.h) for the ops a forward calls most, and the boxed
//     GuardKernel below for the others; both apply the rule rule_of() derives from the schema,
//     with the checks of guard_checks.h;
//   * an op registered later gets its kernel at the next refresh() (each guard entry); until then
//     it reaches the key's boxed fallback, which derives its rule from the schema (slower, never
//     unguarded).

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>

#include "guard_checks.h"
#include "typed_kernels.h"
#include "work_bounds.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

namespace py = pybind11;

namespace {

using namespace write_guard;

// The vocabularies come from Python (dispatch_guard.py), the one place that names them.
struct Vocabulary {
  std::set<std::string> allocators;
  std::set<std::string> growing;
  std::set<std::string> stats_args;
  std::set<std::string> stats_flags;
  std::vector<std::string> stats_read_only;
  std::map<std::string, work_bounds::Cost> costs;  // by op name (all overloads) or "name.overload"
};
Vocabulary g_vocabulary;

// Mirrors dispatch_guard.op_rule (a test compares the two over the whole registry).
Rule rule_of(const c10::FunctionSchema& schema) {
  Rule rule;
  const std::string& full = schema.name();
  const auto sep = full.find("::");
  const std::string name = sep == std::string::npos ? full : full.substr(sep + 2);
  bool read_only_variant = false;
  for (const auto& part : g_vocabulary.stats_read_only) {
    read_only_variant = read_only_variant || name.find(part) != std::string::npos;
  }
  const auto& args = schema.arguments();
  for (size_t i = 0; i < args.size(); ++i) {
    const auto* alias = args[i].alias_info();
    const bool writes = alias != nullptr && alias->isWrite();
    if (writes) {
      rule.written.push_back(i);
    } else if (g_vocabulary.stats_args.count(args[i].name()) && !read_only_variant) {
      rule.stats.push_back(i);
    }
    if (rule.training < 0 && g_vocabulary.stats_flags.count(args[i].name())) {
      rule.training = static_cast<int64_t>(i);
    }
  }
  rule.allocates = g_vocabulary.allocators.count(name) > 0;
  rule.grows = g_vocabulary.growing.count(name) > 0;
  // By "name.overload" for one overload, else by name (all overloads): work_bounds.cost_kind
  auto cost = g_vocabulary.costs.find(name + "." + schema.overload_name());
  if (cost == g_vocabulary.costs.end()) {
    cost = g_vocabulary.costs.find(name);
  }
  if (cost != g_vocabulary.costs.end()) {
    rule.cost = cost->second;
  }
  return rule;
}

bool owns_any(const Ranges& server, const c10::IValue& value) {
  if (value.isTensor()) {
    return owns(server, value.toTensor());
  }
  if (value.isList()) {  // Tensor(a!)[] (e.g. _foreach_*_), Tensor?[]
    for (const c10::IValue& item : value.toListRef()) {
      if (item.isTensor() && owns(server, item.toTensor())) {
        return true;
      }
    }
  }
  return false;
}

// Before any guarded op of a bound request: its stop, then the op's price against its time left.
void check_budget(const Rule& rule, const c10::OperatorHandle& op, c10::ArrayRef<c10::IValue> args) {
  if (work_bounds::t_budget.get() == nullptr) {
    return;
  }
  check_stop(op.schema().name());
  if (rule.cost != work_bounds::Cost::kNone && rule.cost != work_bounds::Cost::kView) {
    const work_bounds::Cost kind = work_bounds::priced_kind(rule.cost, op, args);
    check_price(kind, op.schema().name(), work_bounds::cost_of(kind, op, args), work_bounds::placement(args));
  }
}

// --- the kernels -------------------------------------------------------------------------------

void guarded_call(const Rule& rule, const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const size_t nargs = schema.arguments().size();
  auto args = torch::jit::last(*stack, nargs);
  check_budget(rule, op, args);
  if (!rule.written.empty() || !rule.stats.empty()) {
    const Ranges& server = server_ranges();
    if (!server.starts.empty()) {
      for (size_t position : rule.written) {
        if (owns_any(server, args[position])) {
          refuse(op.schema().name());
        }
      }
      if (!rule.stats.empty()) {
        const bool training = rule.training < 0 || (args[rule.training].isBool() && args[rule.training].toBool());
        if (training) {
          for (size_t position : rule.stats) {
            if (owns_any(server, args[position])) {
              refuse(op.schema().name());
            }
          }
        }
      }
    }
  }
  at::Tensor grown;
  size_t before = 0;
  if (rule.grows && nargs > 0 && args[0].isTensor()) {
    grown = args[0].toTensor();
    before = storage_bytes(grown);
  }
  const bool writes_arg0 = rule.cost == work_bounds::Cost::kView && !rule.written.empty() && nargs > 0 &&
                          args[0].isTensor();
  const at::Tensor set_target = writes_arg0 ? args[0].toTensor() : at::Tensor();
  op.redispatchBoxed(ks & kBelow, stack);
  if (rule.cost == work_bounds::Cost::kView) {
    if (set_target.defined()) {  // set_ / as_strided_: the argument is the view
      check_view(schema.name(), set_target);
    } else {
      for (const c10::IValue& value : torch::jit::last(*stack, schema.returns().size())) {
        if (value.isTensor()) {
          check_view(schema.name(), value.toTensor());
        }
      }
    }
  }
  if (grown.defined()) {
    // resize_ keeps the old bytes at the front (copied if it reallocated); the rest is new
    const c10::Storage& storage = grown.unsafeGetTensorImpl()->unsafe_storage();
    if (storage && storage.nbytes() > before) {
      zero_storage(storage, before);
    }
  }
  if (rule.allocates) {
    for (const c10::IValue& value : torch::jit::last(*stack, schema.returns().size())) {
      if (value.isTensor()) {
        zero_allocation(value.toTensor());
      }
    }
  }
}

class GuardKernel final : public c10::OperatorKernel {
 public:
  explicit GuardKernel(Rule rule) : rule_(std::move(rule)) {}
  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
    guarded_call(rule_, op, ks, stack);
  }

 private:
  Rule rule_;
};

// Ops registered after the last refresh(): rules derived on first sight, kept by operator name.
std::mutex g_late_mutex;
std::unordered_map<c10::OperatorName, std::shared_ptr<const Rule>> g_late_rules;

void late_fallback(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  std::shared_ptr<const Rule> rule;
  {
    std::lock_guard<std::mutex> lock(g_late_mutex);
    auto found = g_late_rules.find(op.operator_name());
    if (found == g_late_rules.end()) {
      found = g_late_rules.emplace(op.operator_name(), std::make_shared<const Rule>(rule_of(op.schema()))).first;
    }
    rule = found->second;
  }
  guarded_call(*rule, op, ks, stack);
}

// --- registration ------------------------------------------------------------------------------

// Op schemas registered with the dispatcher and not yet given a kernel for the key. The listener
// runs under the dispatcher's lock, where registering is impossible: it only queues the name.
std::mutex g_pending_mutex;
std::vector<c10::OperatorName> g_pending;
std::atomic<bool> g_has_pending{false};

class Listener final : public c10::OpRegistrationListener {
 public:
  void onOperatorRegistered(const c10::OperatorHandle& op) override {
    std::lock_guard<std::mutex> lock(g_pending_mutex);
    g_pending.push_back(op.operator_name());
    g_has_pending.store(true);
  }
  void onOperatorDeregistered(const c10::OperatorHandle& /*op*/) override {}
};

std::mutex g_install_mutex;
bool g_installed = false;
int64_t g_guarded_ops = 0;
int64_t g_plain_ops = 0;
int64_t g_typed_ops = 0;  // of the guarded ones
std::vector<c10::RegistrationHandleRAII>* g_registrations = nullptr;  // kept for the process's life

// Give every queued op its kernel for the key: a fallthrough when it has nothing to check, the
// guard's kernel otherwise. Cheap when nothing is queued (one atomic load).
void refresh() {
  if (!g_has_pending.load()) {
    return;
  }
  std::lock_guard<std::mutex> install_lock(g_install_mutex);
  std::vector<c10::OperatorName> names;
  {
    std::lock_guard<std::mutex> lock(g_pending_mutex);
    names.swap(g_pending);
    g_has_pending.store(false);
  }
  auto& dispatcher = c10::Dispatcher::singleton();
  for (const c10::OperatorName& name : names) {
    const auto handle = dispatcher.findSchema(name);
    if (!handle.has_value()) {
      continue;  // an implementation without a schema cannot be called
    }
    Rule rule = rule_of(handle->schema());
    c10::KernelFunction kernel;
    std::optional<c10::impl::CppSignature> signature;
    const char* debug = "ndif write guard";
    const auto typed = typed::kernels().find(name);
    if (rule.plain()) {
      kernel = c10::KernelFunction::makeFallthrough();
      ++g_plain_ops;
    } else if (typed != typed::kernels().end() && typed->second.configure(rule, handle->schema())) {
      kernel = typed->second.kernel();
      signature = typed->second.signature;
      debug = "ndif write guard (typed)";
      ++g_guarded_ops;
      ++g_typed_ops;
    } else {
      kernel = c10::KernelFunction::makeFromBoxedFunctor(std::make_unique<GuardKernel>(std::move(rule)));
      ++g_guarded_ops;
    }
    g_registrations->push_back(dispatcher.registerImpl(name, kKey, std::move(kernel), signature, nullptr, debug));
  }
}

py::dict install(
    py::object error_type,
    const std::vector<std::string>& allocators,
    const std::vector<std::string>& growing,
    const std::vector<std::string>& stats_args,
    const std::vector<std::string>& stats_flags,
    const std::vector<std::string>& stats_read_only,
    const std::vector<py::object>& stop_types,
    py::object limit_type,
    const std::map<std::string, int>& costs) {
  {
    std::lock_guard<std::mutex> lock(g_install_mutex);
    if (!g_installed) {
      g_vocabulary.allocators = {allocators.begin(), allocators.end()};
      g_vocabulary.growing = {growing.begin(), growing.end()};
      g_vocabulary.stats_args = {stats_args.begin(), stats_args.end()};
      g_vocabulary.stats_flags = {stats_flags.begin(), stats_flags.end()};
      g_vocabulary.stats_read_only = stats_read_only;
      for (const auto& entry : costs) {
        g_vocabulary.costs[entry.first] = static_cast<work_bounds::Cost>(entry.second);
      }
      for (const auto& type : stop_types) {
        g_stop_types.push_back(type.inc_ref().ptr());
      }
      g_limit_type = limit_type.inc_ref().ptr();
      g_error_type = error_type.inc_ref().ptr();
      g_registrations = new std::vector<c10::RegistrationHandleRAII>();
      auto& dispatcher = c10::Dispatcher::singleton();
      g_registrations->push_back(dispatcher.registerFallback(
          kKey, c10::KernelFunction::makeFromBoxedFunction<&late_fallback>(), "ndif write guard: late ops"));
      // Reports every op registered so far at once, and each new one as it comes.
      g_registrations->push_back(dispatcher.addRegistrationListener(std::make_unique<Listener>()));
      g_installed = true;
    }
  }
  refresh();
  py::dict out;
  out["guarded_ops"] = g_guarded_ops;
  out["plain_ops"] = g_plain_ops;
  out["typed_ops"] = g_typed_ops;
  return out;
}

int64_t add_table(const std::vector<uintptr_t>& starts, const std::vector<uintptr_t>& ends) {
  TORCH_CHECK(starts.size() == ends.size(), "starts and ends differ in length");
  std::lock_guard<std::mutex> lock(g_tables_mutex);
  const int64_t token = g_next_token++;
  g_tables[token] = Ranges{starts, ends};
  publish_locked();
  return token;
}

void remove_table(int64_t token) {
  std::lock_guard<std::mutex> lock(g_tables_mutex);
  g_tables.erase(token);
  publish_locked();
}

bool set_active(bool active) {
  const bool previous = c10::impl::tls_is_dispatch_key_included(kKey);
  c10::impl::tls_set_dispatch_key_included(kKey, active);
  return previous;
}

bool is_active() { return c10::impl::tls_is_dispatch_key_included(kKey); }

py::tuple rule(const std::string& name, const std::string& overload) {
  const auto handle = c10::Dispatcher::singleton().findSchema({name, overload});
  TORCH_CHECK(handle.has_value(), "no schema for ", name, ".", overload);
  const Rule r = rule_of(handle->schema());
  return py::make_tuple(r.written, r.stats, r.training, r.allocates, r.grows);
}

py::tuple counters() { return py::make_tuple(g_refused.load(), g_zeroed.load()); }

py::tuple budget_counters() { return py::make_tuple(g_stops.load(), g_over_budget.load()); }

// Bind `budget` (or nothing: None) to this thread; returns the one bound before.
std::shared_ptr<work_bounds::Budget> bind_budget(std::shared_ptr<work_bounds::Budget> budget) {
  std::swap(budget, work_bounds::t_budget);
  return budget;
}

int64_t cost_kind(const std::string& name, const std::string& overload) {
  const auto handle = c10::Dispatcher::singleton().findSchema({name, overload});
  TORCH_CHECK(handle.has_value(), "no schema for ", name, ".", overload);
  return static_cast<int64_t>(rule_of(handle->schema()).cost);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Dispatcher kernels of the sandbox's write guard (model_runtime/sandbox/native_guard.py).";
  m.def("install", &install, "Register the guard's kernels for every op in the registry (idempotent).");
  m.def("refresh", &refresh, "Register the guard's kernels for ops registered since (cheap when none).");
  m.def("add_table", &add_table, "Add a server byte-range table (sorted, merged); returns its token.");
  m.def("remove_table", &remove_table);
  m.def("set_active", &set_active, "Put the guard's key in (or out of) this thread's include set; returns the previous state.");
  m.def("is_active", &is_active);
  m.def("rule", &rule, "The rule derived for an op: (written, stats, training, allocates, grows).");
  m.def("counters", &counters, "(refused, zeroed) since the process started.");
  m.def("budget_counters", &budget_counters, "(stops raised, ops over budget) since the process started.");
  m.def("bind_budget", &bind_budget, py::arg("budget").none(true),
        "Bind a request's budget to this thread (None: unbind); returns the previous one.");
  m.def("set_rates", &work_bounds::set_rates, "The replica's work rates (before the first request).");
  m.def("cost_kind", &cost_kind, "The cost family an op is priced by (0: none).");
  py::class_<work_bounds::Budget, std::shared_ptr<work_bounds::Budget>>(m, "Budget")
      .def(py::init([](double seconds_left, size_t cancel) {
             auto budget = std::make_shared<work_bounds::Budget>();
             budget->limit_at = work_bounds::now_s() + seconds_left;
             budget->cancel = cancel;
             return budget;
           }),
           py::arg("seconds_left"), py::arg("cancel"))
      .def("stop", [](work_bounds::Budget& budget) { budget.stopped.store(true); },
           "The request's stop: every guarded op of its thread raises from now on (any thread may call it).")
      .def_property_readonly("stopped", [](const work_bounds::Budget& budget) { return budget.stopped.load(); })
      .def("seconds_left", [](const work_bounds::Budget& budget) { return budget.limit_at - work_bounds::now_s(); });
  m.attr("dispatch_key") = py::str(c10::toString(kKey));
}
