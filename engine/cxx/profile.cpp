// Where a training step's time goes: libtorch's own profiler (Kineto, what torch.profiler runs)
// around some code, with the host's operators and, on CUDA, the device's kernels and copies as
// CUPTI records them. The events come back as text lines for the Rust side to summarise, and the
// whole record can be saved as a Chrome trace (chrome://tracing, Perfetto).
//
// Every function catches every exception and writes its message into `err` (guarded.h).
#include <torch/csrc/autograd/profiler_kineto.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <set>
#include <string>

#include "guarded.h"

namespace {

using cpa::guarded;
namespace prof = torch::autograd::profiler;
using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;

// The last stopped profile, kept until it is read (or the next one starts).
std::unique_ptr<prof::ProfilerResult> last;

std::set<ActivityType> activities(int cuda) {
  std::set<ActivityType> acts{ActivityType::CPU};
  if (cuda != 0) {
    acts.insert(ActivityType::CUDA);
  }
  return acts;
}

}  // namespace

// Starts the profiler on the calling thread (the host's operators it dispatches) and, where
// `cuda` is not 0, CUPTI's record of the device's kernels, copies and fills; with `shapes` not 0
// each operator's input shapes and types are recorded too (for a trace). 0 on success.
extern "C" int cpa_profile_start(int cuda, int shapes, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    last.reset();
    if (cuda == 0) {
      // Without CUDA, Kineto logs "gpuGetDeviceCount failed" as an error when it starts: quiet
      // its log (read once, at its start) unless the caller chose a level.
      setenv("KINETO_LOG_LEVEL", "5", 0);
    }
    const ProfilerConfig config(ProfilerState::KINETO, /*report_input_shapes=*/shapes != 0);
    const auto acts = activities(cuda);
    prof::prepareProfiler(config, acts);
    prof::enableProfiler(config, acts);
  });
}

// Stops the profiler; saves the trace as Chrome's JSON to `trace_path` where it is not empty.
// The events stay for cpa_profile_events. 0 on success.
extern "C" int cpa_profile_stop(const char* trace_path, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    last = prof::disableProfiler();
    if (last && trace_path != nullptr && trace_path[0] != '\0') {
      last->save(trace_path);
    }
  });
}

// The stopped profile's events as lines "device\tthread\tstart_ns\tend_ns\tname\n" (device: "cpu"
// or "cuda"; thread: the host thread, or the device's stream for device events) into `out`, at
// most `capacity` bytes, no terminator. Returns the bytes the whole text needs (nothing written
// when that is more than `capacity`: ask again with room), -1 on an error.
extern "C" int64_t cpa_profile_events(char* out, int64_t capacity) {
  try {
    std::string text;
    if (last) {
      for (const auto& e : last->events()) {
        const bool device = e.deviceType() == c10::DeviceType::CUDA;
        // Host events carry the host thread; device events their stream (as the trace does).
        const uint64_t lane = device ? static_cast<uint64_t>(e.deviceResourceId()) : e.startThreadId();
        std::string name = e.name();
        for (char& c : name) {
          if (c == '\t' || c == '\n') {
            c = ' ';
          }
        }
        text += device ? "cuda\t" : "cpu\t";
        text += std::to_string(lane) + '\t' + std::to_string(e.startNs()) + '\t' + std::to_string(e.endNs()) + '\t';
        text += name;
        text += '\n';
      }
    }
    return cpa::copy_out(text, out, capacity);
  } catch (...) {
    return -1;
  }
}
