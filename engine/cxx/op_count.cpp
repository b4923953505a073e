// Counts the operators libtorch dispatches while a count is open: what a training step costs in
// kernel launches and host synchronisations, read on any build (the CPU's included), since the
// operators a step dispatches do not depend on the device. Uses libtorch's RecordFunction
// callbacks (the profiler's own hook), registered once and idle while no count is open.
//
// A dispatch is counted as a kernel (about one launch on a device) when the operator computes
// (it is not a view, an allocation, a no-op conversion or autograd's bookkeeping) and none of the
// operators it calls computes: `aten::mm` allocates its output through `aten::empty` and is one
// kernel; `aten::zeros` calls `aten::zero_`, which calls `aten::fill_`, the one kernel. Every
// function catches every exception and returns -1. A multi-tensor operator (`_foreach_*`,
// `_fused_*`) counts as one kernel, what CUDA launches for a group of tensors (one per chunk of
// them; the CPU loops over per-tensor operators inside it, which are not counted).
#include <ATen/record_function.h>

#include "guarded.h"

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <thread>
#include <vector>

namespace {

struct Tally {
  int64_t calls = 0;    // every dispatch of the operator, nested ones included
  int64_t kernels = 0;  // dispatches counted as a kernel
  int64_t top = 0;      // dispatches not made from inside another operator
};

// Operators that change metadata only, or allocate without writing.
const char* const metadata_ops[] = {
    "aten::empty",        "aten::empty_strided", "aten::empty_like",   "aten::view",        "aten::_reshape_alias",
    "aten::_unsafe_view", "aten::reshape",       "aten::as_strided",   "aten::as_strided_", "aten::t",
    "aten::transpose",    "aten::expand",        "aten::expand_as",    "aten::unsqueeze",   "aten::squeeze",
    "aten::permute",      "aten::narrow",        "aten::slice",        "aten::select",      "aten::split",
    "aten::split_with_sizes", "aten::chunk",     "aten::unbind",       "aten::alias",       "aten::detach",
    "aten::detach_",      "detach",              "aten::lift_fresh",   "aten::resize_",     "aten::set_",
    "aten::to",           "aten::contiguous",    "aten::flatten",      "aten::result_type", "aten::requires_grad_",
    "aten::resolve_conj", "aten::resolve_neg",   "aten::view_as",      "aten::numpy_T",     "aten::_has_compatible_shallow_copy_type",
};

bool is_metadata(const char* name) {
  if (std::strncmp(name, "autograd::", 10) == 0) {
    return true;  // the autograd engine's evaluation of a node: its work is the operators it calls
  }
  for (const char* op : metadata_ops) {
    if (std::strcmp(name, op) == 0) {
      return true;
    }
  }
  return false;
}

std::mutex tally_mutex;
std::unordered_map<std::string, Tally> tallies;
// Kernels by the operator dispatched at the top (what the caller asked for).
std::unordered_map<std::string, int64_t> kernels_by_top;
std::atomic<bool> counting{false};
std::atomic<bool> registered{false};
std::atomic<bool> one_thread{false};
std::thread::id counted_thread;

// Per thread: for each open operator, whether an operator it called computes.
thread_local std::vector<bool> open_calls;
// Per thread: open multi-tensor operators (what runs inside one is not counted).
thread_local int open_multi = 0;

bool is_multi_tensor(const char* name) {
  return std::strncmp(name, "aten::_foreach_", 15) == 0 || std::strncmp(name, "aten::_fused_", 13) == 0;
}
// Per thread: the name of the outermost open operator.
thread_local std::string top_name;

std::unique_ptr<at::ObserverContext> on_enter(const at::RecordFunction& fn) {
  if (open_calls.empty() && counting.load()) {
    top_name = fn.name();
  }
  if (is_multi_tensor(fn.name())) {
    open_multi += 1;
  }
  open_calls.push_back(false);
  return nullptr;
}

void on_exit(const at::RecordFunction& fn, at::ObserverContext*) {
  if (open_calls.empty()) {
    return;  // opened before the callback was registered
  }
  const bool computing_child = open_calls.back();
  open_calls.pop_back();
  const bool multi = is_multi_tensor(fn.name());
  if (multi) {
    open_multi -= 1;
  }
  if (open_multi > 0) {
    return;  // inside a multi-tensor operator, which is counted as one kernel
  }
  const bool kernel = multi || (!computing_child && !is_metadata(fn.name()));
  if (!open_calls.empty() && (kernel || computing_child)) {
    open_calls.back() = true;
  }
  if (!counting.load()) {
    return;
  }
  std::lock_guard<std::mutex> lock(tally_mutex);
  if (one_thread.load() && std::this_thread::get_id() != counted_thread) {
    return;
  }
  Tally& t = tallies[fn.name()];
  t.calls += 1;
  t.kernels += kernel ? 1 : 0;
  t.top += open_calls.empty() ? 1 : 0;
  if (kernel) {
    kernels_by_top[open_calls.empty() ? std::string(fn.name()) : top_name] += 1;
  }
}

}  // namespace

// Starts a count (clearing the last one) of the operators of every thread, or only of the calling
// one where `this_thread_only` is not 0; registers the callbacks the first time. 0 on success.
extern "C" int cpa_op_count_start(int this_thread_only) {
  try {
    if (!registered.exchange(true)) {
      at::addGlobalCallback(at::RecordFunctionCallback(on_enter, on_exit).scopes({at::RecordScope::FUNCTION}));
    }
    std::lock_guard<std::mutex> lock(tally_mutex);
    tallies.clear();
    kernels_by_top.clear();
    counted_thread = std::this_thread::get_id();
    one_thread.store(this_thread_only != 0);
    counting.store(true);
    return 0;
  } catch (...) {
    return -1;
  }
}

// Stops counting and writes the tallies as lines "name\tcalls\tkernels\ttop\n", then the
// kernels by the outermost operator as lines "<top>\tname\tkernels\n", into `out`
// (at most `capacity` bytes, no terminator). Returns the bytes the whole text needs: when that is
// more than `capacity`, nothing was written and the caller asks again with room for it (the
// tallies are kept until the next start).
extern "C" int64_t cpa_op_count_stop(char* out, int64_t capacity) {
  try {
    counting.store(false);
    std::string text;
    {
      std::lock_guard<std::mutex> lock(tally_mutex);
      for (const auto& [name, t] : tallies) {
        text += name;
        text += '\t' + std::to_string(t.calls) + '\t' + std::to_string(t.kernels) + '\t' + std::to_string(t.top) + '\n';
      }
      for (const auto& [name, n] : kernels_by_top) {
        text += "<top>\t" + name + '\t' + std::to_string(n) + '\n';
      }
    }
    return cpa::copy_out(text, out, capacity);
  } catch (...) {
    return -1;
  }
}
