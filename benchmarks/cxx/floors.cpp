// Two floors as C++ dispatcher fallbacks: measuring instruments for
// benchmarks/sanitize_cxx_floor.py and benchmarks/autocast_cxx_floor.py, not part of mixprec
// (the library's build has no C++ step against torch's headers). They answer one question: what
// would the sanitizer and the emulation cost with their per-op paths out of Python?
//
// The fallback sits on a dispatch key that the benchmark includes in the thread's dispatch key
// set, so it sees every aten op after autograd (forward and backward), as a TorchDispatchMode
// does. torch reserves no such key for an extension's mode. These instruments borrow Fake (just
// below the Python key), which eager torch leaves without kernels or a fallback; a backend
// key such as CustomRNGKeyId would not do: CompositeExplicitAutograd kernels (convolution,
// among others) are registered for every backend key and win over a fallback, so those ops
// would pass unseen. Views always pass through. Modes:
//
// * kPass: every op forwarded unchanged (the cost of the interposition alone).
// * kShadow: the sanitizer's bare shadow, like sanitize_corpus.py's Python BareShadow. Ops
//   without a float32 argument pass through; otherwise the float32 arguments are replaced by
//   their shadows (looked up by storage, as views of a flat float64 shadow laid out like the
//   storage, or upcast), the op runs for real and again on the shadows, each float32 result is
//   compared with its shadow (max |f32(s) - r| and max |s|, one vectorised pass) and a shadow
//   covering its result's storage is kept. No findings, attribution, in-place or view
//   bookkeeping, or gradient hooks.
// * kRoundBf16: the emulation's rounding work, bf16: every float32 argument not known to hold
//   bf16 values is rounded out of place (one pass), the op runs on the rounded arguments, and
//   every float32 result is rounded in place (one pass) and known from then on to hold bf16
//   values (by storage). Ops without a float32 argument (factories) pass through, their
//   results rounded where they are first used. Backward ops are ops too, so gradients are rounded where produced.
//   No policy (every op rounds, reductions and norms included), no straight-through
//   bookkeeping, no formats but bf16.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <unordered_map>
#include <vector>

namespace {

constexpr auto kKey = c10::DispatchKey::Fake;
enum Mode : int64_t { kPass = 0, kShadow = 1, kRoundBf16 = 2 };

struct Entry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;  // keeps the address from being reused
  at::Tensor flat;  // kShadow: float64, laid out like the storage; kRoundBf16: undefined
};

// per storage: its shadow (kShadow), or "holds bf16 values" (kRoundBf16)
std::unordered_map<const c10::StorageImpl*, Entry> g_store;
std::unordered_map<const c10::FunctionSchema*, bool> g_is_view;
int64_t g_mode = kPass;
int64_t g_calls = 0, g_worked = 0, g_puts = 0;
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

const Entry* entry_of(const at::Tensor& t) {
  const auto* st = t.storage().unsafeGetStorageImpl();
  auto it = g_store.find(st);
  return it == g_store.end() || it->second.storage.expired() ? nullptr : &it->second;
}

void keep(const at::Tensor& t, at::Tensor flat) {
  g_store.insert_or_assign(t.storage().unsafeGetStorageImpl(),
                           Entry{t.storage().getWeakStorageImpl(), std::move(flat)});
  if (++g_puts % 64 == 0)
    for (auto it = g_store.begin(); it != g_store.end();)
      it = it->second.storage.expired() ? g_store.erase(it) : std::next(it);
}

bool covers_storage(const at::Tensor& t) {
  return t.storage_offset() == 0 &&
         static_cast<size_t>(t.numel()) * sizeof(float) == t.storage().nbytes();
}

// -- kShadow ----------------------------------------------------------------------------------

at::Tensor shadow_of(const at::Tensor& t) {
  const Entry* e = entry_of(t);
  if (e != nullptr && e->flat.defined() &&
      static_cast<size_t>(e->flat.numel()) * sizeof(float) == t.storage().nbytes())
    return e->flat.as_strided(t.sizes(), t.strides(), t.storage_offset());
  return t.to(at::kDouble);
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
  if (covers_storage(r)) keep(r, s);
}

// -- kRoundBf16 -------------------------------------------------------------------------------

// round to nearest even into bfloat16, NaN kept: one vectorisable pass from src to dst
void round_bf16(const float* src, float* dst, int64_t n) {
  const auto* in = reinterpret_cast<const uint32_t*>(src);
  auto* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = in[i];
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    out[i] = (u & 0x7fffffffu) > 0x7f800000u ? u : r;
  }
}

at::Tensor rounded_copy(const at::Tensor& t) {
  if (t.numel() == 0 || entry_of(t) != nullptr) return t;  // holds bf16 values already
  const at::Tensor src = t.is_non_overlapping_and_dense() ? t : t.contiguous();
  at::Tensor out = at::empty_strided(src.sizes(), src.strides(), src.options());
  round_bf16(src.const_data_ptr<float>(), out.mutable_data_ptr<float>(), src.numel());
  return out;
}

void round_in_place(const at::Tensor& t) {
  if (t.numel() == 0) return;
  if (t.is_non_overlapping_and_dense()) {
    float* p = t.mutable_data_ptr<float>();
    round_bf16(p, p, t.numel());
  } else {
    t.copy_(t.to(at::kBFloat16));  // rare: a result that overlaps itself or has gaps
  }
  if (covers_storage(t)) keep(t, at::Tensor());
}

// -- the fallback -------------------------------------------------------------------------------

c10::IValue map_f32(const c10::IValue& v, at::Tensor (*f)(const at::Tensor&)) {
  if (is_f32(v)) return f(v.toTensor());
  if (!v.isTensorList()) return v;
  std::vector<at::Tensor> out;
  for (const at::Tensor t : v.toTensorList()) out.push_back(is_f32(t) ? f(t) : t);
  return c10::IValue(out);
}

const c10::DispatchKeySet& below() {
  static const auto ks = c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, kKey);
  return ks;
}

void shadowed(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack,
              size_t first) {
  torch::jit::Stack shadows;
  for (size_t i = first; i < stack->size(); ++i) shadows.push_back(map_f32((*stack)[i], shadow_of));
  op.redispatchBoxed(ks & below(), stack);
  try {
    op.callBoxed(&shadows);
  } catch (const std::exception&) {
    return;  // no float64 kernel: unshadowed
  }
  ++g_worked;
  const size_t n_ret = op.schema().returns().size();
  if (shadows.size() != n_ret) return;
  for (size_t i = 0; i < n_ret; ++i) {
    const auto& real = (*stack)[stack->size() - n_ret + i];
    if (is_f32(real) && shadows[i].isTensor())
      compare_and_keep(real.toTensor(), shadows[i].toTensor());
  }
}

void rounded(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack,
             size_t first) {
  const auto& args = op.schema().arguments();
  for (size_t i = first; i < stack->size(); ++i) {
    const auto* alias = args[i - first].alias_info();
    if (alias == nullptr || !alias->isWrite())  // a mutated argument stays itself
      (*stack)[i] = map_f32((*stack)[i], rounded_copy);
  }
  op.redispatchBoxed(ks & below(), stack);
  ++g_worked;
  const size_t n_ret = op.schema().returns().size();
  for (size_t i = stack->size() - n_ret; i < stack->size(); ++i) {
    const auto& v = (*stack)[i];
    if (is_f32(v)) round_in_place(v.toTensor());
    if (v.isTensorList())
      for (const at::Tensor t : v.toTensorList())
        if (is_f32(t)) round_in_place(t);
  }
}

void fallback(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard guard(kKey);  // ops run from here are not seen again
  ++g_calls;
  const size_t first = stack->size() - op.schema().arguments().size();
  if (g_mode == kPass || is_view(op) || !has_f32(*stack, first))
    op.redispatchBoxed(ks & below(), stack);
  else if (g_mode == kShadow)
    shadowed(op, ks, stack, first);
  else
    rounded(op, ks, stack, first);
}

void enable(bool on, int64_t mode) {
  if (mode < kPass || mode > kRoundBf16) throw std::invalid_argument("mode: 0, 1 or 2");
  g_mode = mode;
  c10::impl::tls_set_dispatch_key_included(kKey, on);
  if (!on) g_store.clear();
}

std::vector<double> stats() {
  return {static_cast<double>(g_calls), static_cast<double>(g_worked),
          static_cast<double>(g_puts), g_worst};
}

}  // namespace

TORCH_LIBRARY_IMPL(_, Fake, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("PASS") = static_cast<int64_t>(kPass);
  m.attr("SHADOW") = static_cast<int64_t>(kShadow);
  m.attr("ROUND_BF16") = static_cast<int64_t>(kRoundBf16);
  m.def("enable", &enable, "include (or not) the fallback's key in this thread's dispatch keys");
  m.def("stats", &stats, "[ops seen, ops shadowed or rounded, storages kept, worst difference]");
}
