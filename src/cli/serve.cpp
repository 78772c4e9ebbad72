// microdit serve --ckpt CKPT [--vae W] [--runs DIR] [--host 127.0.0.1] [--port 8188]
#include <pthread.h>
#include <signal.h>

#include <atomic>
#include <thread>
#include <utility>

#include "cli/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "serve/server.h"

namespace microdit::cli {

namespace {

std::atomic<bool> stopping_by_us{false};

struct ServeCliOptions {
  RuntimeOptions rt;
  std::string ckpt, vae;
  serve::ServeOptions serve;
  int scale = 0;
};

void run(const ServeCliOptions& o) {
  set_threads(o.rt.threads);
  MD_CHECK(o.serve.port >= 0 && o.serve.port <= 65535, "--port must be in [0, 65535], got {}", o.serve.port);
  MD_CHECK(o.scale >= 0 && o.scale <= 32, "--scale must be in [0, 32], got {}", o.scale);
  MD_CHECK(o.serve.limits.queue_size >= 1 && o.serve.limits.queue_size <= 1000, "--queue must be in [1, 1000]");
  MD_CHECK(o.serve.limits.max_images >= 1 && o.serve.limits.max_steps >= 1, "--max-images and --max-steps must be >= 1");
  fmt::print("loading {}\n", o.ckpt);
  std::fflush(stdout);
  auto generator = serve::load_checkpoint_generator(o.ckpt, o.vae, o.rt.device, o.scale);
  // Ctrl-C / SIGTERM: blocked in every thread started from here on, taken by one thread
  // that stops the server.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  serve::Server server(o.serve, std::move(generator));
  const int port = server.bind();
  std::atomic<bool> signalled{false};
  std::thread signals([&] {
    int sig = 0;
    sigwait(&sigs, &sig);
    signalled = true;
    if (!stopping_by_us.exchange(false)) {
      fmt::print("\nstopping (signal {})\n", sig);
      std::fflush(stdout);
    }
    server.stop();
  });
  const std::string host = o.serve.host == "0.0.0.0" ? "localhost" : o.serve.host;
  fmt::print("serving on http://{}:{}/  (runs: {}; Ctrl-C stops)\n", host.find(':') != std::string::npos ? "[" + host + "]" : host,
             port, o.serve.runs);
  std::fflush(stdout);
  server.run();
  if (!signalled) {  // stopped otherwise: wake the signal thread with a signal of our own
    stopping_by_us = true;
    pthread_kill(signals.native_handle(), SIGTERM);
  }
  signals.join();
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
  add_runtime_options(*cmd, o->rt);
  cmd->callback([o] { run(*o); });
}

}  // namespace microdit::cli
