#include "dist/launch.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <thread>

#include "core/error.h"

namespace microdit::dist {

std::vector<std::string> own_args_without_nproc() {
  std::ifstream f("/proc/self/cmdline", std::ios::binary);
  const std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<std::string> raw, out;
  for (size_t p = 0; p < all.size();) {
    const size_t e = all.find('\0', p);
    raw.push_back(all.substr(p, e == std::string::npos ? std::string::npos : e - p));
    if (e == std::string::npos) break;
    p = e + 1;
  }
  for (size_t i = 0; i < raw.size(); ++i) {
    if (raw[i] == "--nproc") {
      ++i;
      continue;
    }
    if (raw[i].rfind("--nproc=", 0) == 0) continue;
    out.push_back(raw[i]);
  }
  return out;
}

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  MD_CHECK(fd >= 0, "--nproc: cannot open a socket to find a free port");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof(a);
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0;
  ::close(fd);
  MD_CHECK(ok, "--nproc: cannot find a free port on 127.0.0.1");
  return ntohs(a.sin_port);
}

void launch_local(int nproc, const std::vector<std::string>& args, int threads_per_worker) {
  MD_CHECK(nproc >= 1, "--nproc {}: must be >= 1", nproc);
  MD_CHECK(!args.empty(), "--nproc: empty command line");
  const int port = free_port();
  std::vector<pid_t> pids(nproc, -1);
  for (int r = 0; r < nproc; ++r) {
    const pid_t pid = ::fork();
    MD_CHECK(pid >= 0, "--nproc: fork failed for rank {}", r);
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);  // a killed launcher (scancel, kill) takes its workers along
      ::setenv("RANK", std::to_string(r).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("MASTER_ADDR", "127.0.0.1", 1);
      ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      ::unsetenv("TORCHELASTIC_USE_AGENT_STORE");
      if (threads_per_worker > 0) ::setenv("OMP_NUM_THREADS", std::to_string(threads_per_worker).c_str(), 1);
      std::vector<char*> argv;
      for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      ::execv("/proc/self/exe", argv.data());
      std::fprintf(stderr, "microdit: error: rank %d: cannot start /proc/self/exe\n", r);
      std::_Exit(127);
    }
    pids[r] = pid;
  }
  int running = nproc, failed_rank = -1, failed_status = 0;
  auto kill_deadline = std::chrono::steady_clock::time_point::max();
  while (running > 0) {
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid < 0) break;
    if (pid == 0) {  // nobody finished: stop the stragglers of a failed job after 10 s
      if (std::chrono::steady_clock::now() > kill_deadline) {
        for (pid_t p : pids)
          if (p > 0) ::kill(p, SIGKILL);
        kill_deadline = std::chrono::steady_clock::time_point::max();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      continue;
    }
    int r = -1;
    for (int i = 0; i < nproc; ++i)
      if (pids[i] == pid) r = i;
    if (r < 0) continue;
    pids[r] = -1;
    --running;
    const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    if (!ok && failed_rank < 0) {
      failed_rank = r;
      failed_status = status;
      for (pid_t p : pids)
        if (p > 0) ::kill(p, SIGTERM);
      kill_deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    }
  }
  if (failed_rank >= 0) {
    if (WIFSIGNALED(failed_status))
      fail("rank {} of {} was killed by signal {}; the other ranks were stopped", failed_rank, nproc,
           WTERMSIG(failed_status));
    fail("rank {} of {} exited with code {}; the other ranks were stopped", failed_rank, nproc,
         WEXITSTATUS(failed_status));
  }
}

}  // namespace microdit::dist
