#include "core/progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>

namespace microdit {

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const auto t = static_cast<int64_t>(std::lround(s));
  if (t >= 3600) return fmt::format("{}:{:02}:{:02}", t / 3600, t / 60 % 60, t % 60);
  return fmt::format("{}:{:02}", t / 60, t % 60);
}

ProgressBar::ProgressBar(std::string label, int64_t total, std::string unit, std::FILE* out)
    : label_(std::move(label)), unit_(std::move(unit)), total_(total), out_(out),
      tty_(::isatty(::fileno(out)) != 0), start_(Clock::now()), last_draw_(start_) {}

ProgressBar::~ProgressBar() {
  if (!finished_) finish(extra_);
}

double ProgressBar::elapsed_seconds() const {
  return std::chrono::duration<double>(Clock::now() - start_).count();
}

std::string ProgressBar::line(const std::string& extra) const {
  const double t = elapsed_seconds();
  const double rate = t > 0 ? done_ / t : 0.0;
  std::string s = label_;
  if (total_ > 0) {
    constexpr int kWidth = 24;
    const double frac = std::clamp(static_cast<double>(done_) / total_, 0.0, 1.0);
    const int filled = static_cast<int>(frac * kWidth);
    s += fmt::format(" [{}{}] {}/{} {:3.0f}%", std::string(filled, '#'),
                     std::string(kWidth - filled, '.'), done_, total_, frac * 100);
  } else {
    s += fmt::format(" {}", done_);
  }
  s += fmt::format(" {:.1f} {}/s", rate, unit_);
  if (finished_ || (total_ > 0 && done_ >= total_)) {
    s += " in " + format_duration(t);
  } else if (total_ > 0) {
    s += " ETA " + (rate > 0 ? format_duration((total_ - done_) / rate) : std::string("?"));
  }
  if (!extra.empty()) s += " " + extra;
  return s;
}

void ProgressBar::update(int64_t done, const std::string& extra) {
  done_ = done;
  extra_ = extra;
  if (!tty_ || finished_) return;
  const auto now = Clock::now();
  if (now - last_draw_ < std::chrono::milliseconds(100) && done_ != total_) return;
  last_draw_ = now;
  const std::string s = line(extra);
  // Pad with spaces so a shorter line fully covers the previous one.
  fmt::print(out_, "\r{}{}", s, std::string(last_width_ > s.size() ? last_width_ - s.size() : 0, ' '));
  std::fflush(out_);
  last_width_ = s.size();
}

void ProgressBar::finish(const std::string& extra) {
  if (finished_) return;
  finished_ = true;
  const std::string s = line(extra);
  fmt::print(out_, "{}{}{}\n", tty_ ? "\r" : "", s,
             std::string(tty_ && last_width_ > s.size() ? last_width_ - s.size() : 0, ' '));
  std::fflush(out_);
}

}  // namespace microdit
