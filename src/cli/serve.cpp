// microdit serve --ckpt CKPT [--vae W] [--runs DIR] [--host 127.0.0.1] [--port 8188]
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <thread>

#include "cli/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "serve/server.h"

namespace microdit::cli {

namespace {

int g_wake[2] = {-1, -1};            // signal handler -> watcher thread
volatile std::sig_atomic_t g_serving = 0;

extern "C" void on_signal(int sig) {  // async-signal-safe: _exit and write only
  if (!g_serving) ::_exit(128 + sig);
  const char c = static_cast<char>(sig);
  [[maybe_unused]] auto w = ::write(g_wake[1], &c, 1);
}

struct ServeCliOptions {
  RuntimeOptions rt;
  std::string ckpt, vae, precision = "auto";
  serve::ServeOptions serve;
  int scale = 0;
};

void run(const ServeCliOptions& o) {
  set_threads(o.rt.threads);
  MD_CHECK(o.serve.port >= 0 && o.serve.port <= 65535, "--port must be in [0, 65535], got {}", o.serve.port);
  MD_CHECK(o.scale >= 0 && o.scale <= 32, "--scale must be in [0, 32], got {}", o.scale);
  MD_CHECK(o.serve.limits.queue_size >= 1 && o.serve.limits.queue_size <= 1000, "--queue must be in [1, 1000]");
  MD_CHECK(o.serve.limits.max_images >= 1 && o.serve.limits.max_steps >= 1, "--max-images and --max-steps must be >= 1");
  // Ctrl-C / SIGTERM: a handler (installed before LibTorch starts its threads, any of which
  // may receive the signal) exits at once while the model loads, and once serving, tells a
  // watcher thread through a pipe to stop the server. Installing it also undoes the SIGINT
  // "ignore" that shells give background jobs.
  MD_CHECK(::pipe(g_wake) == 0, "serve: cannot create a pipe");
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
  fmt::print("loading {}\n", o.ckpt);
  std::fflush(stdout);
  serve::Server server(o.serve, serve::load_checkpoint_generator(o.ckpt, o.vae, o.rt.device, o.scale, o.precision));
  const int port = server.bind();
  std::thread watcher([&] {
    char sig = 0;
    while (::read(g_wake[0], &sig, 1) < 0 && errno == EINTR) {
    }
    if (sig != 0) {
      fmt::print("\nstopping (signal {})\n", static_cast<int>(sig));
      std::fflush(stdout);
    }
    server.stop();
  });
  g_serving = 1;
  const std::string host = o.serve.host == "0.0.0.0" ? "localhost" : o.serve.host;
  fmt::print("serving on http://{}:{}/  (runs: {}; Ctrl-C stops)\n", host.find(':') != std::string::npos ? "[" + host + "]" : host,
             port, o.serve.runs);
  std::fflush(stdout);
  server.run();
  const char none = 0;  // stopped otherwise: wake the watcher (a no-op if a signal did)
  [[maybe_unused]] auto w = ::write(g_wake[1], &none, 1);
  watcher.join();
  server.stop();
  fmt::print("stopped\n");
}

}  // namespace

void register_serve(CLI::App& app) {
  auto o = std::make_shared<ServeCliOptions>();
  auto* cmd = app.add_subcommand("serve", "local web page: generate pictures, watch training runs");
  cmd->add_option("--ckpt", o->ckpt, "training checkpoint (.safetensors); its EMA weights are used")->required();
  cmd->add_option("--vae", o->vae, "latent models: VAE (diffusers folder or .safetensors) that decodes the samples");
  cmd->add_option("--runs", o->serve.runs, "folder of training runs for the dashboard (only files in it are read)")
      ->capture_default_str();
  cmd->add_option("--host", o->serve.host, "address to listen on (0.0.0.0: every interface)")->capture_default_str();
  cmd->add_option("--port", o->serve.port, "port (0: any free port)")->capture_default_str();
  cmd->add_option("--queue", o->serve.limits.queue_size, "generations that may wait behind the running one")
      ->capture_default_str();
  cmd->add_option("--max-images", o->serve.limits.max_images, "images per request")->capture_default_str();
  cmd->add_option("--max-steps", o->serve.limits.max_steps, "sampler steps per request")->capture_default_str();
  cmd->add_option("--scale", o->scale, "enlarge each picture this many times (0: 4 for pixel models, 1 for latent)")
      ->capture_default_str();
  add_precision_option(*cmd, o->precision);
  add_runtime_options(*cmd, o->rt);
  cmd->callback([o] { run(*o); });
}

}  // namespace microdit::cli
