// Collectives of a torch.distributed process group, which tch does not bind. The group is made
// by torch.distributed in the same process (gloo on the CPU, NCCL on CUDA: `init_process_group`
// registers it under its name in libtorch's group registry) and found here by that name, so
// this file needs c10d's generic headers only (not gloo's or NCCL's, which the PyTorch wheels
// do not ship). Tensors are tch's, which are `at::Tensor*` behind its C API. Every function
// catches every exception and writes its message to `err` (NUL-terminated, cut to `err_len`).
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "guarded.h"

#include <chrono>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

using cpa::guarded;

void all_reduce(const std::string& group, at::Tensor& t) {
  auto pg = c10d::resolve_process_group(group);
  std::vector<at::Tensor> tensors{t};
  c10d::AllreduceOptions options;
  options.reduceOp = c10d::ReduceOp::SUM;
  pg->allreduce(tensors, options)->wait();
}

// Batch normalisation of a [cells, features] batch split over the ranks of a group, as one
// process normalises the whole batch: the mean and (biased) variance of every rank's cells,
// two passes, and in the backward pass the sums of the output's gradient over every rank's
// cells. The weight's and bias's gradients are this rank's (the trainer sums every gradient
// over the ranks after the backward pass). The gradient of each rank's loss must already be
// its share of the whole batch's loss.
struct SyncBatchNorm : public torch::autograd::Function<SyncBatchNorm> {
  // The normalised batch, then the batch's mean and variance (not differentiable).
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& bias,
                                                const std::string& group, double cells, double eps) {
    auto acc = x.to(at::kDouble);
    auto sum = acc.sum(0);
    all_reduce(group, sum);
    auto mean = sum / cells;
    auto centred = acc - mean;
    auto squares = (centred * centred).sum(0);
    all_reduce(group, squares);
    auto var = squares / cells;
    auto invstd = (var + eps).rsqrt();
    auto xhat = (centred * invstd).to(x.scalar_type());
    ctx->save_for_backward({xhat, invstd.to(x.scalar_type()), weight});
    ctx->saved_data["group"] = group;
    ctx->saved_data["cells"] = cells;
    auto stats_mean = mean.to(x.scalar_type());
    auto stats_var = var.to(x.scalar_type());
    ctx->mark_non_differentiable({stats_mean, stats_var});
    return {xhat * weight + bias, stats_mean, stats_var};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& xhat = saved[0];
    const auto& invstd = saved[1];
    const auto& weight = saved[2];
    auto group = ctx->saved_data["group"].toStringRef();
    double cells = ctx->saved_data["cells"].toDouble();
    auto gy = grads[0];
    auto grad_bias = gy.sum(0);
    auto grad_weight = (gy * xhat).sum(0);
    auto both = at::cat({grad_bias, grad_weight}).to(at::kDouble);
    all_reduce(group, both);
    auto n = grad_bias.size(0);
    auto mean_gy = (both.narrow(0, 0, n) / cells).to(gy.scalar_type());
    auto mean_gy_xhat = (both.narrow(0, n, n) / cells).to(gy.scalar_type());
    auto grad_x = weight * invstd * (gy - mean_gy - xhat * mean_gy_xhat);
    return {grad_x, grad_weight, grad_bias, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

// Synchronised batch normalisation (see SyncBatchNorm) of `x` with `weight` and `bias` over the
// `cells` cells of every rank's batch, updating `running_mean` and `running_var` with
// `momentum` as BatchNorm1d does (the unbiased variance); the result (a new at::Tensor*) in
// `*out`. All tensors are at::Tensor*. 0 on success.
extern "C" int cpa_sync_batch_norm(const char* group, void* x, void* weight, void* bias, void* running_mean,
                                   void* running_var, double cells, double momentum, double eps, void** out,
                                   char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto& input = *static_cast<at::Tensor*>(x);
    std::string name(group);
    auto outputs = SyncBatchNorm::apply(input, *static_cast<at::Tensor*>(weight), *static_cast<at::Tensor*>(bias),
                                        name, cells, eps);
    auto y = outputs[0];
    {
      at::NoGradGuard no_grad;
      auto& rm = *static_cast<at::Tensor*>(running_mean);
      auto& rv = *static_cast<at::Tensor*>(running_var);
      const auto& mean = outputs[1];
      const auto& var = outputs[2];
      rm.mul_(1.0 - momentum).add_(mean, momentum);
      double unbiased = cells > 1.0 ? cells / (cells - 1.0) : 1.0;
      rv.mul_(1.0 - momentum).add_(var * unbiased, momentum);
    }
    *out = new at::Tensor(std::move(y));
  });
}

// The rank of this process and the size of the group `group`; 0 on success.
extern "C" int cpa_group_rank_size(const char* group, int* rank, int* size, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto pg = c10d::resolve_process_group(group);
    *rank = pg->getRank();
    *size = pg->getSize();
  });
}

// Sums `tensor` (an at::Tensor*) in place over the group, waiting at most `timeout_ms`
// milliseconds (0: the group's own timeout); 0 on success.
extern "C" int cpa_all_reduce_sum(const char* group, void* tensor, int64_t timeout_ms, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto pg = c10d::resolve_process_group(group);
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    auto work = pg->allreduce(tensors, options);
    if (timeout_ms > 0) {
      work->wait(std::chrono::milliseconds(timeout_ms));
    } else {
      work->wait();
    }
  });
}

// Replaces `tensor` (an at::Tensor*) by rank `root`'s in every process of the group; 0 on success.
extern "C" int cpa_broadcast(const char* group, void* tensor, int root, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto pg = c10d::resolve_process_group(group);
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    pg->broadcast(tensors, options)->wait();
  });
}
