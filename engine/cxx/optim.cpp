// The optimizer's step over all of a group's tensors at once, which tch does not bind: libtorch's
// fused Adam (`torch.optim.Adam(fused=True)`'s kernel: one pass over each parameter on the CPU,
// a few multi-tensor launches for the whole group on CUDA, where the update written out takes
// eight or more launches a parameter) and gradient clipping by the group's joint norm through
// the `_foreach` kernels. Tensors are tch's (`at::Tensor*` behind its C API). Every function
// catches every exception and writes its message to `err` (NUL-terminated, cut to `err_len`).
#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/clamp_max.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/stack.h>

#include "guarded.h"

#include <cstdint>
#include <cstring>
#include <exception>
#include <vector>

namespace {

using cpa::guarded;

std::vector<at::Tensor> tensors(void* const* ptrs, int64_t n) {
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    out.push_back(*static_cast<at::Tensor*>(ptrs[i]));
  }
  return out;
}

}  // namespace

// One Adam step of `n` parameters with their gradients (consumed: the kernel may write into
// them) and moments, at step `step` (a one-element float32 tensor on the parameters' device,
// shared by every parameter). `decoupled`: AdamW's weight decay instead of Adam's L2 term.
extern "C" int cpa_fused_adam(void* const* params, void* const* grads, void* const* exp_avgs,
                              void* const* exp_avg_sqs, int64_t n, void* step, double lr, double beta1,
                              double beta2, double weight_decay, double eps, int decoupled, char* err,
                              size_t err_len) {
  return guarded(err, err_len, [&] {
    auto p = tensors(params, n);
    auto g = tensors(grads, n);
    // The CPU kernel walks each tensor's memory in order.
    for (auto& t : g) {
      t = t.contiguous();
    }
    auto m = tensors(exp_avgs, n);
    auto v = tensors(exp_avg_sqs, n);
    std::vector<at::Tensor> steps(static_cast<size_t>(n), *static_cast<at::Tensor*>(step));
    if (decoupled != 0) {
      at::_fused_adamw_(p, g, m, v, {}, steps, lr, beta1, beta2, weight_decay, eps, false, false);
    } else {
      at::_fused_adam_(p, g, m, v, {}, steps, lr, beta1, beta2, weight_decay, eps, false, false);
    }
  });
}

// Scales `n` gradients in place so that their joint 2-norm is at most `max_norm` (by
// max_norm / (norm + 1e-6) where that is under 1), without reading the norm on the host.
extern "C" int cpa_clip_grad_norm(void* const* grads, int64_t n, double max_norm, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto g = tensors(grads, n);
    if (g.empty()) {
      return;
    }
    auto norms = at::_foreach_norm(g, 2);
    auto total = at::linalg_vector_norm(at::stack(norms), 2);
    auto coef = at::clamp_max(at::reciprocal(total.add(1e-6)).mul(max_norm), 1.0);
    at::_foreach_mul_(g, coef);
  });
}
