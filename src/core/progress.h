// A one-line progress bar: "label [#####.....] 120/3655 3% 85.1 img/s ETA 0:41 extra".
// On a terminal it redraws in place with \r (at most ~10 times a second); when the stream
// is not a terminal (a log file, a pipe) it stays quiet and prints only the final line.
#pragma once
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace microdit {

// "0:07", "12:34", "1:02:03"; "?" for a negative or non-finite duration.
std::string format_duration(double seconds);

class ProgressBar {
 public:
  // total <= 0: unknown length (no bar, no ETA). unit names the items in the rate.
  ProgressBar(std::string label, int64_t total, std::string unit = "it", std::FILE* out = stdout);
  ~ProgressBar();  // finishes the line if finish() was not called
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  // Sets the count done so far; `extra` (e.g. "loss 0.123") is shown at the end of the line.
  void update(int64_t done, const std::string& extra = "");
  void advance(int64_t n = 1, const std::string& extra = "") { update(done_ + n, extra); }
  // Prints the final line (always, terminal or not) and a newline.
  void finish(const std::string& extra = "");

  // The line as it would be drawn now (for tests and for callers that log it themselves).
  std::string line(const std::string& extra) const;
  double elapsed_seconds() const;
  bool interactive() const { return tty_; }

 private:
  using Clock = std::chrono::steady_clock;
  std::string label_, unit_;
  int64_t total_, done_ = 0;
  std::FILE* out_;
  bool tty_, finished_ = false;
  size_t last_width_ = 0;
  Clock::time_point start_, last_draw_;
  std::string extra_;
};

}  // namespace microdit
