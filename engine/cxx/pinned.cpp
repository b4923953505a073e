// Host-to-device copies through pinned (page-locked) host memory, which tch does not bind: a
// copy from pageable memory blocks the calling thread while the driver stages it, and runs at a
// fraction of the bus's rate; from pinned memory it is queued on the stream and the host goes on.
// The pinned block comes from libtorch's caching host allocator, which keeps it until the copy
// that reads it has run (the copy records an event on it), and reuses it for later batches.
#include <ATen/core/Tensor.h>

#include "guarded.h"

// Copies the host tensor `src` (any memory) into the device tensor `dst` (same size and type)
// through a pinned copy of `src`, without waiting for the device: `src` may be released when
// this returns, `dst` is ready for work queued after it on the current stream. 0 on success.
extern "C" int cpa_copy_through_pinned(void* src, void* dst, char* err, size_t err_len) {
  return cpa::guarded(err, err_len, [&] {
    const auto& from = *static_cast<at::Tensor*>(src);
    auto& to = *static_cast<at::Tensor*>(dst);
    to.copy_(from.pin_memory(), /*non_blocking=*/true);
  });
}
