// The conventions of the engine's C++ wrappers. Errors: a function runs its body under
// `guarded`, returns 0, or -1 with the exception's message in `err` (NUL-terminated, cut to
// `err_len`). Text results: `copy_out` writes the whole text or nothing and returns its length,
// so the caller asks again with room for it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>

namespace cpa {

inline void write_error(const char* what, char* err, size_t err_len) {
  if (err == nullptr || err_len == 0) {
    return;
  }
  std::strncpy(err, what, err_len - 1);
  err[err_len - 1] = '\0';
}

template <typename F>
int guarded(char* err, size_t err_len, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
  } catch (...) {
    write_error("unknown C++ exception", err, err_len);
  }
  return -1;
}

// Copies `text` into `out` (no terminator) where it fits in `capacity` bytes; returns its length
// either way (nothing is written when it does not fit).
inline int64_t copy_out(const std::string& text, char* out, int64_t capacity) {
  const auto needed = static_cast<int64_t>(text.size());
  if (needed <= capacity && out != nullptr) {
    std::memcpy(out, text.data(), text.size());
  }
  return needed;
}

}  // namespace cpa
