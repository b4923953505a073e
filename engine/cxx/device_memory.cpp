// The CUDA caching allocator's memory statistics, which tch does not bind: what
// torch.cuda.memory_allocated / max_memory_allocated / memory_reserved / max_memory_reserved
// report in Python, and torch.cuda.empty_cache. Only libtorch's device-generic allocator
// interface is used (no CUDA headers). Every function catches every exception: a libtorch
// without CUDA, or with no device, gives -1 and leaves `out` untouched.
#include <ATen/DeviceAccelerator.h>

#include <cstdint>

namespace {

c10::DeviceAllocator* cuda_allocator() {
  return at::getDeviceAllocator(c10::DeviceType::CUDA);
}

}  // namespace

// Writes current allocated, peak allocated, current reserved and peak reserved bytes of
// `device` to out[0..4]; 0 on success.
extern "C" int cpa_cuda_memory_stats(int device, int64_t* out) {
  try {
    auto stats = cuda_allocator()->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    constexpr auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = stats.allocated_bytes[all].current;
    out[1] = stats.allocated_bytes[all].peak;
    out[2] = stats.reserved_bytes[all].current;
    out[3] = stats.reserved_bytes[all].peak;
    return 0;
  } catch (...) {
    return -1;
  }
}

// Sets the peaks of `device` to the current values; 0 on success.
extern "C" int cpa_cuda_reset_peak_memory(int device) {
  try {
    cuda_allocator()->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
}

// Returns the allocator's unused cached blocks to the device; 0 on success.
extern "C" int cpa_cuda_empty_cache() {
  try {
    cuda_allocator()->emptyCache();
    return 0;
  } catch (...) {
    return -1;
  }
}
