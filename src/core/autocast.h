// Scoped bf16 autocast for one device type; restores the previous state on exit, also when
// the guarded code throws.
#pragma once
#include <ATen/autocast_mode.h>

namespace microdit {

class AutocastGuard {
 public:
  AutocastGuard(c10::DeviceType device, bool enabled)
      : device_(device), was_enabled_(at::autocast::is_autocast_enabled(device)),
        was_dtype_(at::autocast::get_autocast_dtype(device)) {
    at::autocast::set_autocast_enabled(device_, enabled);
    if (enabled) at::autocast::set_autocast_dtype(device_, at::kBFloat16);
  }
  ~AutocastGuard() {
    at::autocast::set_autocast_enabled(device_, was_enabled_);
    at::autocast::set_autocast_dtype(device_, was_dtype_);
    at::autocast::clear_cache();
  }
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  c10::DeviceType device_;
  bool was_enabled_;
  at::ScalarType was_dtype_;
};

}  // namespace microdit
