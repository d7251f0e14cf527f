// The float64 shadow mechanism as a C++ dispatcher fallback: a measuring instrument for
// benchmarks/sanitize_cxx_floor.py, not part of mixprec (the library's build has no C++ step
// against torch's headers). It answers one question: what would the sanitizer's floor be with
// its per-op path out of Python?
//
// The fallback sits on a dispatch key that the benchmark includes in the thread's dispatch key
// set, so it sees every aten op after autograd (forward and backward), as a TorchDispatchMode
// does. torch reserves no such key for an extension's mode. This instrument borrows Fake (just
// below the Python key), which eager torch leaves without kernels or a fallback; a backend
// key such as CustomRNGKeyId would not do: CompositeExplicitAutograd kernels (convolution,
// among others) are registered for every backend key and win over a fallback, so those ops
// would pass unseen. Per op, like the benchmark's Python
// BareShadow: views pass through; ops without a float32 argument pass through; otherwise the
// float32 arguments are replaced by their shadows (looked up by storage, as views of a flat
// float64 shadow laid out like the storage, or upcast), the op runs for real and again on the
// shadows, each float32 result is compared with its shadow (max |f32(s) - r| and max |s|, one
// vectorised pass) and a shadow covering its result's storage is kept. No findings, no
// attribution, no in-place or view bookkeeping, no gradient hooks.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cmath>
#include <unordered_map>
#include <vector>

namespace {

constexpr auto kKey = c10::DispatchKey::Fake;

struct Entry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;  // keeps the address from being reused
  at::Tensor flat;  // float64, laid out like the storage
};

std::unordered_map<const c10::StorageImpl*, Entry> g_store;
std::unordered_map<const c10::FunctionSchema*, bool> g_is_view;
bool g_shadow = true;  // false: pass every op through (the C++ dispatch floor)
int64_t g_calls = 0, g_shadowed = 0, g_puts = 0;
double g_worst = 0;  // largest max|f32(s) - r| / max|s| seen: keeps the comparison observable

bool is_view(const c10::OperatorHandle& op) {
  const auto* key = &op.schema();
  auto it = g_is_view.find(key);
  if (it != g_is_view.end()) return it->second;
  bool view = false;
  for (const auto& r : op.schema().returns())
    view = view || (r.alias_info() && !r.alias_info()->isWrite());
  g_is_view.emplace(key, view);
  return view;
}

bool is_f32(const at::Tensor& t) { return t.defined() && t.scalar_type() == at::kFloat; }

bool is_f32(const c10::IValue& v) { return v.isTensor() && is_f32(v.toTensor()); }

bool has_f32(const torch::jit::Stack& stack, size_t first) {
  for (size_t i = first; i < stack.size(); ++i) {
    if (is_f32(stack[i])) return true;
    if (stack[i].isTensorList())
      for (const at::Tensor t : stack[i].toTensorList())
        if (is_f32(t)) return true;
  }
  return false;
}

at::Tensor shadow_of(const at::Tensor& t) {
  const auto* st = t.storage().unsafeGetStorageImpl();
  auto it = g_store.find(st);
  if (it != g_store.end() && !it->second.storage.expired() &&
      static_cast<size_t>(it->second.flat.numel()) * sizeof(float) == st->nbytes())
    return it->second.flat.as_strided(t.sizes(), t.strides(), t.storage_offset());
  return t.to(at::kDouble);
}

c10::IValue shadow_arg(const c10::IValue& v) {
  if (is_f32(v)) return shadow_of(v.toTensor());
  if (!v.isTensorList()) return v;
  std::vector<at::Tensor> out;
  for (const at::Tensor t : v.toTensorList()) out.push_back(is_f32(t) ? shadow_of(t) : t);
  return c10::IValue(out);
}

void sweep() {
  for (auto it = g_store.begin(); it != g_store.end();)
    it = it->second.storage.expired() ? g_store.erase(it) : std::next(it);
}

void compare_and_keep(const at::Tensor& r, const at::Tensor& s) {
  if (s.scalar_type() != at::kDouble || !r.sizes().equals(s.sizes()) || r.numel() == 0) return;
  if (!r.is_contiguous() || !s.is_contiguous()) return;
  const float* rp = r.const_data_ptr<float>();
  const double* sp = s.const_data_ptr<double>();
  float dm = 0, sm = 0;
  for (int64_t i = 0, n = r.numel(); i < n; ++i) {
    const float s32 = static_cast<float>(sp[i]);
    dm = std::max(dm, std::fabs(s32 - rp[i]));
    sm = std::max(sm, std::fabs(s32));
  }
  if (sm > 0) g_worst = std::max(g_worst, static_cast<double>(dm / sm));
  const auto* st = r.storage().unsafeGetStorageImpl();
  if (r.storage_offset() == 0 && static_cast<size_t>(r.numel()) * sizeof(float) == st->nbytes()) {
    g_store.insert_or_assign(st, Entry{r.storage().getWeakStorageImpl(), s});
    if (++g_puts % 64 == 0) sweep();
  }
}

void fallback(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  static const auto below = c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, kKey);
  c10::impl::ExcludeDispatchKeyGuard guard(kKey);  // ops run from here are not seen again
  ++g_calls;
  const size_t n_args = op.schema().arguments().size();
  const size_t first = stack->size() - n_args;
  if (!g_shadow || is_view(op) || !has_f32(*stack, first)) {
    op.redispatchBoxed(ks & below, stack);
    return;
  }
  torch::jit::Stack shadows;
  for (size_t i = first; i < stack->size(); ++i) shadows.push_back(shadow_arg((*stack)[i]));
  op.redispatchBoxed(ks & below, stack);
  try {
    op.callBoxed(&shadows);
  } catch (const std::exception&) {
    return;  // no float64 kernel: unshadowed
  }
  ++g_shadowed;
  const size_t n_ret = op.schema().returns().size();
  if (shadows.size() != n_ret) return;
  for (size_t i = 0; i < n_ret; ++i) {
    const auto& real = (*stack)[stack->size() - n_ret + i];
    if (is_f32(real) && shadows[i].isTensor()) compare_and_keep(real.toTensor(), shadows[i].toTensor());
  }
}

void enable(bool on, bool shadow) {
  g_shadow = shadow;
  c10::impl::tls_set_dispatch_key_included(kKey, on);
  if (!on) g_store.clear();
}

std::vector<double> stats() {
  return {static_cast<double>(g_calls), static_cast<double>(g_shadowed),
          static_cast<double>(g_puts), g_worst};
}

}  // namespace

TORCH_LIBRARY_IMPL(_, Fake, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("enable", &enable, "include (or not) the fallback's key in this thread's dispatch keys");
  m.def("stats", &stats, "[ops seen, ops shadowed, shadows kept, worst relative difference]");
}
