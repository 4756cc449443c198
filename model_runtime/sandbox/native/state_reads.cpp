// Cheap "has it changed?" reads of the global state global_state.py restores around every request.
//
// `settings()` packs, as int64s, what the torch getter bindings of the settings named by
// `names()` read (at::globalContext(), the autograd, autocast, torch-function and dispatch-key
// thread-local states, the autograd fallback and graph-executor modes), read from the same
// accessors, each value packed with its own slot (an optional's presence apart from its value):
// two equal records mean every one of those getters would answer the same. global_state.py
// reads the record and, when it equals the one taken with its last full read, keeps those
// getters' values from that read instead of calling them (their pybind bindings and device
// string parsing cost microseconds each in place); any difference sends it to the getters.
// `configure(devices)` names the autocast device types covered, once (their records follow the
// named settings). The fp32 precisions are left to their getters: the legacy matmul precision's
// setter moves the per-backend ones, and its getter refuses some of their combinations.
//
// `cpu_rng()` packs the default CPU generator's whole state (the Mersenne Twister's seed, counters
// and words, and both cached normal samples, as its `get_state` serialises them), under the
// generator's lock; `set_cpu_rng(record)` puts such a record back. `python_rng(random)` returns a
// `random.Random`'s index and words (CPython's private layout, which global_state.py checks
// against `getstate()` before relying on it). Comparing these records, a few KB, is what spares
// the per-request get + set of both generators when a request drew nothing.
#include <torch/extension.h>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <c10/core/AutogradState.h>
#include <c10/core/DefaultDtype.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/anomaly_mode.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/jit/python/update_graph_executor_opt.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace {

// global_settings.py's setting names, in the record's order (the autocast ones follow, per device).
const char* const kNames[] = {
    "set_fwd_grad_enabled",
    "set_multithreading_enabled",
    "set_view_replay_enabled",
    "set_deterministic_fill_uninitialized_memory",
    "set_warnAlways",
    "set_cudnn_enabled",
    "set_cudnn_benchmark",
    "set_cudnn_deterministic",
    "set_cudnn_allow_tf32",
    "set_cublas_allow_tf32",
    "set_cublas_allow_fp16_reduced_precision_reduction",
    "set_cublas_allow_bf16_reduced_precision_reduction",
    "set_cublas_allow_fp16_accumulation",
    "set_mkldnn_enabled",
    "set_mkldnn_deterministic",
    "set_nnpack_enabled",
    "set_miopen_immediate",
    "set_qengine",
    "set_sdp_use_flash",
    "set_sdp_use_mem_efficient",
    "set_sdp_use_math",
    "set_sdp_use_cudnn",
    "set_sdp_use_fa3",
    "set_sdp_use_overrideable",
    "set_math_sdp_allow_fp16_bf16_reduction",
    "set_sdp_priority_order",
    "set_sm_carveout_experimental",
    "set_meta_in_tls_dispatch_include",
    "set_check_sparse_tensor_invariants",
    "set_linalg_preferred_backend",
    "set_blas_preferred_backend",
    "set_rocm_fa_preferred_backend",
    "set_torch_function_state",
    "set_autograd_fallback_mode",
    "set_graph_executor_optimize",
    "set_cudnn_depthwise_kernel",
    "grad_mode",
    "inference_mode",
    "autocast_cache",
    "default_dtype",
    "deterministic_algorithms",
    "anomaly_mode",
    "num_threads",
};
constexpr size_t kCount = sizeof(kNames) / sizeof(kNames[0]);

std::vector<c10::DeviceType>& autocast_devices() {
  static std::vector<c10::DeviceType> devices;
  return devices;
}

void configure(const std::vector<std::string>& devices) {
  std::vector<c10::DeviceType> types;
  for (const std::string& name : devices) {
    types.push_back(c10::Device(name).type());
  }
  autocast_devices() = std::move(types);
}

template <typename T>
void put_optional(std::vector<int64_t>& out, const std::optional<T>& value) {
  out.push_back(value.has_value() ? 1 : 0);
  out.push_back(value.has_value() ? static_cast<int64_t>(*value) : 0);
}

py::bytes settings() {
  at::Context& ctx = at::globalContext();
  const c10::AutogradState& autograd = c10::AutogradState::get_tls_state();
  std::vector<int64_t> out;
  out.reserve(kCount + 16 + 2 * autocast_devices().size());
  out.push_back(autograd.get_fw_grad_mode());
  out.push_back(autograd.get_multithreading_enabled());
  out.push_back(autograd.get_view_replay_enabled());
  out.push_back(ctx.deterministicFillUninitializedMemory());
  out.push_back(c10::WarningUtils::get_warnAlways());
  out.push_back(ctx.userEnabledCuDNN());
  out.push_back(ctx.benchmarkCuDNN());
  out.push_back(ctx.deterministicCuDNN());
  out.push_back(ctx.allowTF32CuDNN());
  out.push_back(ctx.allowTF32CuBLAS());
  out.push_back(static_cast<int64_t>(ctx.allowFP16ReductionCuBLAS()));
  out.push_back(static_cast<int64_t>(ctx.allowBF16ReductionCuBLAS()));
  out.push_back(ctx.allowFP16AccumulationCuBLAS());
  out.push_back(ctx.userEnabledMkldnn());
  out.push_back(ctx.deterministicMkldnn());
  out.push_back(ctx.userEnabledNNPACK());
  out.push_back(ctx.immediateMiopen());
  out.push_back(static_cast<int64_t>(ctx.qEngine()));
  out.push_back(ctx.userEnabledFlashSDP());
  out.push_back(ctx.userEnabledMemEfficientSDP());
  out.push_back(ctx.userEnabledMathSDP());
  out.push_back(ctx.userEnabledCuDNNSDP());
  out.push_back(ctx.userEnabledFA3SDP());
  out.push_back(ctx.userEnabledOverrideableSDP());
  out.push_back(ctx.allowFP16BF16ReductionMathSDP());
  const auto order = ctx.sDPPriorityOrder();
  out.push_back(static_cast<int64_t>(order.size()));
  for (const at::SDPBackend backend : order) {
    out.push_back(static_cast<int64_t>(backend));
  }
  put_optional(out, ctx._SMCarveout_EXPERIMENTAL());
  out.push_back(c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Meta));
  put_optional(out, ctx.checkSparseTensorInvariants());
  out.push_back(static_cast<int64_t>(ctx.linalgPreferredBackend()));
  out.push_back(static_cast<int64_t>(ctx.blasPreferredBackend()));
  out.push_back(static_cast<int64_t>(ctx.getROCmFAPreferredBackend()));
  out.push_back(static_cast<int64_t>(at::impl::PythonTorchFunctionTLS::get_disabled_state()));
  out.push_back(static_cast<int64_t>(torch::autograd::getAutogradFallbackMode()));
  out.push_back(torch::jit::getGraphExecutorOptimize());
  out.push_back(static_cast<int64_t>(ctx.cudnnDepthwiseKernel()));
  out.push_back(c10::GradMode::is_enabled());
  out.push_back(c10::InferenceMode::is_enabled());
  out.push_back(at::autocast::is_autocast_cache_enabled());
  out.push_back(static_cast<int64_t>(c10::get_default_dtype_as_scalartype()));
  out.push_back(ctx.deterministicAlgorithms());
  out.push_back(ctx.deterministicAlgorithmsWarnOnly());
  out.push_back(torch::autograd::AnomalyMode::is_enabled());
  out.push_back(torch::autograd::AnomalyMode::should_check_nan());
  out.push_back(at::get_num_threads());
  for (const c10::DeviceType device : autocast_devices()) {
    out.push_back(at::autocast::is_autocast_enabled(device));
    out.push_back(static_cast<int64_t>(at::autocast::get_autocast_dtype(device)));
  }
  return py::bytes(reinterpret_cast<const char*>(out.data()), out.size() * sizeof(int64_t));
}

py::tuple names() {
  py::tuple out(kCount);
  for (size_t i = 0; i < kCount; ++i) {
    out[i] = py::str(kNames[i]);
  }
  return out;
}

// The default CPU generator's state, packed field by field (no padding bytes).
struct CpuRngRecord {
  uint64_t seed;
  int64_t left;
  int64_t seeded;
  int64_t next;
  int64_t has_float;
  double float_sample;
  int64_t has_double;
  double double_sample;
  uint32_t state[at::MERSENNE_STATE_N];
};

at::CPUGeneratorImpl* cpu_generator() {
  return at::check_generator<at::CPUGeneratorImpl>(at::detail::getDefaultCPUGenerator());
}

py::bytes cpu_rng() {
  at::CPUGeneratorImpl* gen = cpu_generator();
  CpuRngRecord record{};
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    const at::mt19937_data_pod data = gen->engine().data();
    const std::optional<float> f = gen->next_float_normal_sample();
    const std::optional<double> d = gen->next_double_normal_sample();
    record.seed = data.seed_;
    record.left = data.left_;
    record.seeded = data.seeded_;
    record.next = data.next_;
    record.has_float = f.has_value();
    record.float_sample = f.has_value() ? static_cast<double>(*f) : 0.0;
    record.has_double = d.has_value();
    record.double_sample = d.has_value() ? *d : 0.0;
    std::memcpy(record.state, data.state_.data(), sizeof(record.state));
  }
  return py::bytes(reinterpret_cast<const char*>(&record), sizeof(record));
}

void set_cpu_rng(const std::string& packed) {
  TORCH_CHECK(packed.size() == sizeof(CpuRngRecord), "set_cpu_rng: not a cpu_rng() record");
  CpuRngRecord record{};
  std::memcpy(&record, packed.data(), sizeof(record));
  at::mt19937_data_pod data{};
  data.seed_ = record.seed;
  data.left_ = static_cast<int>(record.left);
  data.seeded_ = record.seeded != 0;
  data.next_ = static_cast<uint32_t>(record.next);
  std::memcpy(data.state_.data(), record.state, sizeof(record.state));
  at::mt19937 engine;
  engine.set_data(data);
  at::CPUGeneratorImpl* gen = cpu_generator();
  std::lock_guard<std::mutex> lock(gen->mutex_);
  gen->set_engine(engine);
  gen->set_next_float_normal_sample(
      record.has_float ? std::optional<float>(static_cast<float>(record.float_sample)) : std::nullopt);
  gen->set_next_double_normal_sample(record.has_double ? std::optional<double>(record.double_sample) : std::nullopt);
}

// CPython's `random.Random` instance layout (Modules/_randommodule.c); checked by the caller.
struct RandomObject {
  PyObject_HEAD
  int index;
  uint32_t state[624];
};

py::bytes python_rng(py::handle random) {
  const auto* object = reinterpret_cast<const RandomObject*>(random.ptr());
  return py::bytes(reinterpret_cast<const char*>(&object->index), sizeof(object->index) + sizeof(object->state));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("configure", &configure, py::arg("devices"));
  m.def("settings", &settings);
  m.def("names", &names);
  m.def("cpu_rng", &cpu_rng);
  m.def("set_cpu_rng", &set_cpu_rng, py::arg("record"));
  m.def("python_rng", &python_rng, py::arg("random"));
}
