// What each server tensor is, read in one C++ pass: integrity.py's per-request identity check.
//
// `identities(tensors)` packs, per tensor, the fields of `weight_records.Identity` as int64s:
// storage pointer, storage bytes, storage offset, dtype, flags (conj, neg, requires_grad, has
// .grad), number of dimensions, then the sizes and the strides. Two calls give equal bytes
// exactly when every tensor's identity is equal (the number of dimensions fixes the layout).
// A tensor without a plain storage raises (as `untyped_storage()` does); the caller then reads
// the identities in Python.
//
// `gather(plan)` reads the content fingerprint's samples of host storages: `plan` packs int64
// triples (address, step, count), and the result is, per triple, the `count` bytes `step` apart
// from `address`, concatenated (what numpy's strided views of the same bytes concatenate to, with
// no array per storage). The caller passes only addresses inside storages it holds, and only
// after every tensor's storage pointer and size matched its record.
#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

py::bytes identities(const std::vector<at::Tensor>& tensors) {
  std::vector<int64_t> out;
  out.reserve(tensors.size() * 12);
  for (const at::Tensor& t : tensors) {
    const c10::Storage& storage = t.storage();
    out.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(storage.data_ptr().get())));
    out.push_back(static_cast<int64_t>(storage.nbytes()));
    out.push_back(t.storage_offset());
    out.push_back(static_cast<int64_t>(t.scalar_type()));
    out.push_back((t.is_conj() ? 1 : 0) | (t.is_neg() ? 2 : 0) | (t.requires_grad() ? 4 : 0) |
                  (t.grad().defined() ? 8 : 0));
    const auto sizes = t.sizes();
    const auto strides = t.strides();
    out.push_back(static_cast<int64_t>(sizes.size()));
    out.insert(out.end(), sizes.begin(), sizes.end());
    out.insert(out.end(), strides.begin(), strides.end());
  }
  return py::bytes(reinterpret_cast<const char*>(out.data()), out.size() * sizeof(int64_t));
}

py::bytes gather(const std::string& plan) {
  const size_t triples = plan.size() / (3 * sizeof(int64_t));
  std::vector<int64_t> fields(triples * 3);
  std::memcpy(fields.data(), plan.data(), fields.size() * sizeof(int64_t));
  size_t total = 0;
  for (size_t i = 0; i < triples; ++i) {
    total += static_cast<size_t>(fields[3 * i + 2]);
  }
  std::string out(total, '\0');
  char* to = out.data();
  for (size_t i = 0; i < triples; ++i) {
    const char* from = reinterpret_cast<const char*>(static_cast<uintptr_t>(fields[3 * i]));
    const int64_t step = fields[3 * i + 1];
    for (int64_t k = 0; k < fields[3 * i + 2]; ++k) {
      *to++ = from[k * step];
    }
  }
  return py::bytes(out);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("identities", &identities, py::arg("tensors"));
  m.def("gather", &gather, py::arg("plan"));
}
