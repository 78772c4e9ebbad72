// `microdit serve`: a local web server with one page (generate pictures from a prompt, watch
// training runs) and the small JSON API the page uses (docs/serve.md). One model is loaded at
// start; generations run one at a time from a bounded queue; every request is bounded; files
// are only read from inside the runs folder, and nothing is written.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "data/image.h"

namespace microdit::serve {

// What one POST /api/generate asks for (validated: see parse_generate_request).
struct GenerateRequest {
  std::string prompt;
  int64_t n = 4;        // images; image i starts from the noise of seed + i
  int64_t steps = 30;
  double cfg = 4.0;
  uint64_t seed = 0;
};

// The server's own caps (within eval/sampling_limits.h's).
struct ServeLimits {
  int64_t max_images = 16;     // per request
  int64_t max_steps = 200;
  size_t max_prompt_bytes = 1000;
  size_t max_body_bytes = 16 * 1024;
  size_t queue_size = 4;       // generations waiting behind the running one
  size_t keep_jobs = 64;       // finished generations kept in memory (their PNGs)
};

// Parses and checks a JSON body; throws microdit::Error with a one-line message naming the
// field (the server answers 400 with it). Missing fields take GenerateRequest's defaults.
GenerateRequest parse_generate_request(const std::string& body, const ServeLimits& limits);

// Makes the pictures of one request, in order; `on_image(i, picture)` is called as each is
// ready (the checkpoint generator makes a few at a time: as many as CPU threads, or all of
// them on a GPU). `cancelled()` is polled between those groups.
class ImageGenerator {
 public:
  virtual ~ImageGenerator() = default;
  virtual std::string describe() const = 0;  // one line for the page: checkpoint, model, encoder
  virtual std::string sample_command(const GenerateRequest& r) const = 0;  // the equivalent CLI call
  virtual void generate(const GenerateRequest& r, const std::function<void(int64_t, const Image&)>& on_image,
                        const std::function<bool()>& cancelled) = 0;
};

// A training checkpoint (EMA weights), its text encoder and, for latent models, a VAE;
// `precision` as the sample command's --precision (auto, bf16 or fp32).
std::unique_ptr<ImageGenerator> load_checkpoint_generator(const std::string& ckpt, const std::string& vae,
                                                          const std::string& device, int scale = 0,
                                                          const std::string& precision = "auto");


struct ServeOptions {
  std::string host = "127.0.0.1";
  int port = 8188;         // 0: any free port (see Server::port())
  std::string runs = "runs";
  ServeLimits limits;
};

class Server {
 public:
  Server(ServeOptions options, std::unique_ptr<ImageGenerator> generator);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;
  // Binds (throws microdit::Error naming host:port when it cannot); returns the port.
  int bind();
  int port() const;
  // Serves until stop() (from any thread or a signal-waiting thread). Call bind() first.
  void run();
  void stop();
  // For tests: hold the worker before it starts the next generation (queue behaviour).
  void pause_worker(bool paused);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Runs folder helpers (exposed for tests). A run is a direct sub-folder of `runs` with a
// metrics.jsonl or a checkpoints/ folder. Names are checked (letters, digits, . _ -, no
// leading dot) and must be listed in `runs`: the empty string when NAME is not a run.
std::string run_dir(const std::string& runs, const std::string& name);
std::vector<std::string> list_runs(const std::string& runs);
std::string run_summary_json(const std::string& runs, const std::string& name);
std::string run_metrics_json(const std::string& runs, const std::string& name);
std::string run_samples_json(const std::string& runs, const std::string& name);

}  // namespace microdit::serve
