// The negative binomial reconstruction likelihood of a count decoder, from the decoder's logits,
// as one autograd node with its gradient written out. Autograd's own graph of the same
// arithmetic (softmax, the library scaling, log(mu + theta), the entries picked out of two
// cells x genes tensors, lgamma) takes some forty passes over cells x genes a step, each
// pick's backward a zero-filled cells x genes tensor, where this takes fourteen, and it
// evaluates lgamma and digamma of theta once a gene instead of once an entry. Tensors are tch's
// (`at::Tensor*` behind its C API); every function catches every exception and writes its
// message to `err` (NUL-terminated, cut to `err_len`).
#include <ATen/TensorOperators.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>

#include "guarded.h"

#include <cstddef>
#include <cstdint>

namespace {

using cpa::guarded;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Per cell, the sum over genes of log NB(x; mu, theta) with mu = softmax(logits) * exp(log_library)
// and theta = exp(log_theta) (one a gene), x given by its non-zero entries (row, column, value),
// as engine/src/model/likelihood.rs's `count_log_likelihood_sparse` computes it (`eps` where it
// adds LOG_EPS). Outputs: the per-cell log-likelihood and mu (not differentiable).
//
// With s = mu + theta + eps and t = log s, a cell's log-likelihood is
//   sum_g theta_g log(theta_g + eps) - t . theta
//   + sum over its entries of x (log(mu + eps) - t) + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1),
// so that
//   d/dmu    = -theta / s + [entry] x (1 / (mu + eps) - 1 / s),
//   d/dtheta = log(theta + eps) + theta / (theta + eps) - t - theta / s
//              + [entry] (-x / s + digamma(x + theta) - digamma(theta)),
// and through mu = exp(log_library) softmax(logits), with a = mu * d/dmu,
//   d/dlogits = a - softmax(logits) * (sum over genes of a).
struct NbLogLikelihood : public torch::autograd::Function<NbLogLikelihood> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& log_library,
                               const at::Tensor& log_theta, const at::Tensor& rows, const at::Tensor& cols,
                               const at::Tensor& values, double eps) {
    const auto genes = logits.size(1);
    auto p = at::softmax(logits, -1);
    auto mu = p * log_library.exp();
    auto theta = log_theta.exp();
    auto s = mu + (theta + eps);
    auto t = s.log();
    auto ll = at::mv(t, theta).neg_().add_((theta * (theta + eps).log()).sum());
    auto flat = rows * genes + cols;
    auto mu_at = mu.view(-1).index_select(0, flat);
    auto t_at = t.view(-1).index_select(0, flat);
    auto theta_at = theta.index_select(0, cols);
    auto terms = values * ((mu_at + eps).log_() - t_at);
    terms.add_((values + theta_at).lgamma_()).sub_(theta.lgamma().index_select(0, cols)).sub_((values + 1.0).lgamma_());
    ll.index_add_(0, rows, terms);
    ctx->save_for_backward({p, mu, s, t, theta, rows, cols, values, flat, mu_at, theta_at});
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mu});
    // mu's gradient is never used: no zero-filled cells x genes tensor for it.
    ctx->set_materialize_grads(false);
    return {ll, mu};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& p = saved[0];
    const auto& mu = saved[1];
    const auto& s = saved[2];
    const auto& t = saved[3];
    const auto& theta = saved[4];
    const auto& rows = saved[5];
    const auto& cols = saved[6];
    const auto& values = saved[7];
    const auto& flat = saved[8];
    const auto& mu_at = saved[9];
    const auto& theta_at = saved[10];
    const double eps = ctx->saved_data["eps"].toDouble();
    if (!grads[0].defined()) {
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    auto g = grads[0].contiguous();
    auto q = s.reciprocal();
    auto q_at = q.view(-1).index_select(0, flat);
    auto g_at = g.index_select(0, rows);

    // The logits: a = mu * d/dmu, less softmax * its sum over genes.
    auto a = mu * q;
    a.mul_(theta).mul_(g.neg().unsqueeze(1));
    auto entry = g_at * values * mu_at * ((mu_at + eps).reciprocal_() - q_at);
    a.view(-1).index_add_(0, flat, entry);
    auto row_sums = a.sum(1, true);
    auto grad_logits = a.addcmul_(p, row_sums, -1.0);

    // log theta: theta * d/dtheta, weighted by each cell's gradient and summed over cells.
    auto grad_theta = ((theta + eps).log() + theta / (theta + eps)).mul_(g.sum());
    grad_theta.sub_(at::mv(t.t(), g)).sub_(theta * at::mv(q.t(), g));
    auto per_entry = g_at * ((values + theta_at).digamma_() - values * q_at);
    grad_theta.index_add_(0, cols, per_entry);
    auto weight = at::zeros_like(theta).index_add_(0, cols, g_at);
    grad_theta.sub_(theta.digamma().mul_(weight));
    auto grad_log_theta = grad_theta.mul_(theta);
    return {grad_logits, at::Tensor(), grad_log_theta, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

// The per-cell NB log-likelihood (a new at::Tensor* in `*ll`, differentiable in `logits` and
// `log_theta`) and the means mu (a new at::Tensor* in `*mu`, not differentiable) of a count
// decoder's `logits` (cells x genes, float32), `log_library` (cells x 1), `log_theta` (genes),
// and the counts' non-zero entries `rows`, `cols` (int64) and `values` (float32). 0 on success.
extern "C" int cpa_nb_log_likelihood(void* logits, void* log_library, void* log_theta, void* rows, void* cols,
                                     void* values, double eps, void** ll, void** mu, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto outputs = NbLogLikelihood::apply(
        *static_cast<at::Tensor*>(logits), *static_cast<at::Tensor*>(log_library),
        *static_cast<at::Tensor*>(log_theta), *static_cast<at::Tensor*>(rows), *static_cast<at::Tensor*>(cols),
        *static_cast<at::Tensor*>(values), eps);
    *ll = new at::Tensor(std::move(outputs[0]));
    *mu = new at::Tensor(std::move(outputs[1]));
  });
}
