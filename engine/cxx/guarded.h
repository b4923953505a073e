// The error convention of the engine's C++ wrappers: a function runs its body under `guarded`,
// returns 0, or -1 with the exception's message in `err` (NUL-terminated, cut to `err_len`).
#pragma once

#include <cstddef>
#include <cstring>
#include <exception>

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

}  // namespace cpa
