#include <gtest/gtest.h>

#include <cstdio>

#include "core/progress.h"

using namespace microdit;

TEST(Progress, FormatsDurations) {
  EXPECT_EQ(format_duration(0), "0:00");
  EXPECT_EQ(format_duration(65.4), "1:05");
  EXPECT_EQ(format_duration(3 * 3600 + 62), "3:01:02");
  EXPECT_EQ(format_duration(-1), "?");
}

TEST(Progress, QuietOffATerminalExceptTheFinalLine) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  {
    ProgressBar bar("rendering", 10, "img", f);
    EXPECT_FALSE(bar.interactive());
    for (int i = 1; i <= 10; ++i) bar.update(i);
    const std::string l = bar.line("loss 0.5");
    EXPECT_NE(l.find("rendering ["), std::string::npos) << l;
    EXPECT_NE(l.find("10/10 100%"), std::string::npos) << l;
    EXPECT_NE(l.find("img/s"), std::string::npos) << l;
    EXPECT_NE(l.find("loss 0.5"), std::string::npos) << l;
  }  // the destructor finishes
  std::rewind(f);
  char buf[512] = {};
  const size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  const std::string out(buf, n);
  EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
  EXPECT_EQ(out.find('\r'), std::string::npos) << out;
  EXPECT_NE(out.find(" in 0:00"), std::string::npos) << out;
}

TEST(Progress, EtaWhileRunning) {
  std::FILE* f = std::tmpfile();
  ProgressBar bar("x", 100, "it", f);
  bar.update(0);
  EXPECT_NE(bar.line("").find("ETA ?"), std::string::npos) << bar.line("");
  bar.finish();
  std::fclose(f);
}
