// HTTP routes (Debian's cpp-httplib), the generation queue and its worker thread.
#include "serve/server.h"

#include <httplib.h>
#include <limits.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <fstream>
#include <map>
#include <mutex>
#include <regex>
#include <sstream>
#include <thread>

#include "core/error.h"
#include "core/fs.h"
#include "eval/sampling_limits.h"
#include "serve/page.h"

namespace microdit::serve {

using json = nlohmann::json;

GenerateRequest parse_generate_request(const std::string& body, const ServeLimits& limits) {
  MD_CHECK(body.size() <= limits.max_body_bytes, "the request body has {} bytes, at most {} are accepted",
           body.size(), limits.max_body_bytes);
  auto j = json::parse(body, nullptr, false);
  MD_CHECK(!j.is_discarded() && j.is_object(), "the request body must be a JSON object");
  static const char* kKnown[] = {"prompt", "n", "steps", "cfg", "seed"};
  for (auto& [k, v] : j.items()) {
    bool known = false;
    for (const char* name : kKnown) known |= k == name;
    MD_CHECK(known, "unknown field '{}' (prompt, n, steps, cfg, seed)", k.substr(0, 40));
  }
  GenerateRequest r;
  MD_CHECK(j.contains("prompt") && j["prompt"].is_string(), "'prompt' must be a string");
  r.prompt = j["prompt"].get<std::string>();
  MD_CHECK(r.prompt.find_first_not_of(" \t\r\n") != std::string::npos, "'prompt' is empty");
  MD_CHECK(r.prompt.size() <= limits.max_prompt_bytes, "'prompt' has {} bytes, at most {} are accepted",
           r.prompt.size(), limits.max_prompt_bytes);
  // Integers: JSON integers only (no 2.5, no "4", no 1e30).
  auto integer = [&](const char* key, int64_t lo, int64_t hi, int64_t def) -> int64_t {
    if (!j.contains(key)) return def;
    const auto& v = j[key];
    MD_CHECK(v.is_number_integer(), "'{}' must be an integer in [{}, {}]", key, lo, hi);
    const bool ok = v.is_number_unsigned()
                        ? v.get<uint64_t>() >= static_cast<uint64_t>(lo) && v.get<uint64_t>() <= static_cast<uint64_t>(hi)
                        : v.get<int64_t>() >= lo && v.get<int64_t>() <= hi;  // (lo >= 0 here)
    MD_CHECK(ok, "'{}' must be an integer in [{}, {}], got {}", key, lo, hi, v.dump());
    return v.get<int64_t>();
  };
  r.n = integer("n", 1, std::min(limits.max_images, SamplingLimits::kMaxImagesPerPrompt), r.n);
  r.steps = integer("steps", 1, std::min(limits.max_steps, SamplingLimits::kMaxSteps), r.steps);
  r.seed = static_cast<uint64_t>(integer("seed", 0, static_cast<int64_t>(SamplingLimits::kMaxSeed), 0));
  if (j.contains("cfg")) {
    MD_CHECK(j["cfg"].is_number(), "'cfg' must be a number in [0, {}]", SamplingLimits::kMaxCfg);
    r.cfg = j["cfg"].get<double>();
  }
  MD_CHECK(std::isfinite(r.cfg) && r.cfg >= 0 && r.cfg <= SamplingLimits::kMaxCfg,
           "'cfg' must be a number in [0, {}], got {}", SamplingLimits::kMaxCfg, r.cfg);
  check_sampling_values(r.n, r.steps, r.cfg, r.seed);  // the command line's bounds too
  return r;
}

namespace {

struct Job {
  uint64_t id = 0;
  GenerateRequest req;
  std::string status = "queued";  // queued, running, done, error, cancelled
  std::string command, error;
  std::vector<std::string> pngs;
  std::vector<std::pair<int, int>> sizes;
  double seconds = 0;
};

std::string error_json(const std::string& message) { return json{{"error", message}}.dump(); }

std::string real_path(const std::string& p) {
  char buf[PATH_MAX];
  return ::realpath(p.c_str(), buf) ? std::string(buf) : std::string();
}

}  // namespace

struct Server::Impl {
  ServeOptions opt;
  std::unique_ptr<ImageGenerator> gen;
  httplib::Server http;
  int port = 0;
  bool bound = false;

  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::shared_ptr<Job>> queue;
  std::map<uint64_t, std::shared_ptr<Job>> jobs;
  std::shared_ptr<Job> running;
  uint64_t next_id = 1;
  bool stopping = false, paused = false, listening = false;
  std::thread worker;

  json job_json(const Job& j) {  // under mu
    json images = json::array();
    for (size_t i = 0; i < j.pngs.size(); ++i)
      images.push_back({{"index", i},
                        {"seed", j.req.seed + i},
                        {"width", j.sizes[i].first},
                        {"height", j.sizes[i].second},
                        {"url", fmt::format("/api/jobs/{}/images/{}.png", j.id, i)}});
    json out{{"id", j.id},         {"status", j.status},     {"prompt", j.req.prompt}, {"n", j.req.n},
             {"steps", j.req.steps}, {"cfg", j.req.cfg},      {"seed", j.req.seed},     {"done", j.pngs.size()},
             {"total", j.req.n},   {"images", images},       {"command", j.command},   {"seconds", j.seconds}};
    if (!j.error.empty()) out["error"] = j.error;
    if (j.status == "queued") {
      size_t pos = 0;
      for (size_t i = 0; i < queue.size(); ++i)
        if (queue[i]->id == j.id) pos = i + 1;
      out["position"] = pos;
    }
    return out;
  }

  void trim_jobs() {  // under mu: drop the oldest finished jobs beyond keep_jobs
    size_t finished = 0;
    for (auto& [id, j] : jobs) finished += j->status != "queued" && j->status != "running";
    for (auto it = jobs.begin(); it != jobs.end() && finished > opt.limits.keep_jobs;) {
      if (it->second->status != "queued" && it->second->status != "running") {
        it = jobs.erase(it);
        --finished;
      } else {
        ++it;
      }
    }
  }

  void work() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock lk(mu);
        cv.wait(lk, [&] { return stopping || (!paused && !queue.empty()); });
        if (stopping) {
          for (auto& q : queue) q->status = "cancelled", q->error = "the server stopped";
          queue.clear();
          return;
        }
        job = queue.front();
        queue.pop_front();
        job->status = "running";
        running = job;
      }
      cv.notify_all();
      const auto t0 = std::chrono::steady_clock::now();
      std::string err;
      try {
        gen->generate(
            job->req,
            [&](int64_t, const Image& im) {
              std::string png = encode_png(im);
              std::lock_guard lk(mu);
              job->pngs.push_back(std::move(png));
              job->sizes.emplace_back(im.width, im.height);
              cv.notify_all();
            },
            [&] {
              std::lock_guard lk(mu);
              return stopping;
            });
      } catch (const std::exception& e) {
        err = e.what();
        err = err.substr(0, err.find('\n'));
      }
      std::lock_guard lk(mu);
      job->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      job->status = !err.empty() ? "error" : static_cast<int64_t>(job->pngs.size()) == job->req.n ? "done" : "cancelled";
      job->error = err;
      running.reset();
      trim_jobs();
      cv.notify_all();
    }
  }

  void send_json(httplib::Response& res, int status, const std::string& body) {
    res.status = status;
    res.set_header("Cache-Control", "no-store");
    res.set_content(body, "application/json");
  }

  // A file of a run: samples/step-N.png or one of the run's final pictures, read only after
  // its real path is checked to lie inside the run folder.
  void send_run_file(httplib::Response& res, const std::string& name, const std::string& rel) {
    static const std::regex ok("samples/step-[0-9]{1,12}\\.png|samples\\.png|colour-check\\.png|loss\\.png");
    const std::string dir = run_dir(opt.runs, name);
    if (dir.empty() || !std::regex_match(rel, ok)) return send_json(res, 404, error_json("no such run file"));
    const std::string path = real_path(dir + "/" + rel);
    if (path.empty() || !path.starts_with(dir + "/") || !is_regular_file(path) || file_size(path) > (64u << 20))
      return send_json(res, 404, error_json("no such run file"));
    std::ifstream in(path, std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    res.set_header("Cache-Control", "no-cache");
    res.set_content(ss.str(), "image/png");
  }

  void routes() {
    // SO_REUSEADDR only: httplib's default SO_REUSEPORT would let a second server share a port.
    http.set_socket_options([](socket_t sock) {
      int yes = 1;
      ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    });
    http.set_payload_max_length(opt.limits.max_body_bytes);
    http.set_read_timeout(10, 0);
    http.set_write_timeout(10, 0);
    http.set_default_headers({{"X-Content-Type-Options", "nosniff"}, {"Referrer-Policy", "no-referrer"}});
    http.set_exception_handler([this](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
      std::string msg = "internal error";
      try {
        if (ep) std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        msg = e.what();
      } catch (...) {
      }
      send_json(res, 500, error_json(msg.substr(0, msg.find('\n'))));
    });
    http.set_error_handler([this](const httplib::Request&, httplib::Response& res) {
      if (!res.body.empty()) return;
      const char* msg = res.status == 404   ? "not found"
                        : res.status == 413 ? "the request body is too large"
                        : res.status == 405 ? "method not allowed"
                                            : "bad request";
      const int st = res.status;
      send_json(res, st, error_json(res.status == 413 ? fmt::format("the request body is too large (at most {} bytes)",
                                                                      opt.limits.max_body_bytes)
                                                      : std::string(msg)));
    });

    // Bound to loopback: answer only requests addressed to a loopback name, so that a web page
    // whose DNS name is rebound to 127.0.0.1 cannot read this server (DNS rebinding).
    const bool loopback = opt.host == "127.0.0.1" || opt.host == "localhost" || opt.host == "::1";
    http.set_pre_routing_handler([this, loopback](const httplib::Request& req, httplib::Response& res) {
      if (!loopback) return httplib::Server::HandlerResponse::Unhandled;
      std::string host = req.get_header_value("Host");
      if (const auto colon = host.rfind(':'); colon != std::string::npos && host.find(']', colon) == std::string::npos)
        host = host.substr(0, colon);
      if (host.empty() || host == "127.0.0.1" || host == "localhost" || host == "[::1]")
        return httplib::Server::HandlerResponse::Unhandled;
      send_json(res, 403, error_json("this server answers only requests to 127.0.0.1 or localhost (see --host)"));
      return httplib::Server::HandlerResponse::Handled;
    });

    http.Get("/", [](const httplib::Request&, httplib::Response& res) {
      res.set_header("Cache-Control", "no-cache");
      res.set_header("Content-Security-Policy",
                     "default-src 'self'; img-src 'self' data: blob:; style-src 'unsafe-inline'; "
                     "script-src 'unsafe-inline'; connect-src 'self'");
      res.set_content(page_html(), "text/html; charset=utf-8");
    });
    http.Get("/favicon.ico", [](const httplib::Request&, httplib::Response& res) { res.status = 204; });

    http.Get("/api/info", [this](const httplib::Request&, httplib::Response& res) {
      std::lock_guard lk(mu);
      const auto& l = opt.limits;
      send_json(res, 200,
                json{{"model", gen->describe()},
                     {"runs", opt.runs},
                     {"queue", {{"waiting", queue.size()}, {"running", running != nullptr}, {"size", l.queue_size}}},
                     {"limits",
                      {{"max_images", std::min(l.max_images, SamplingLimits::kMaxImagesPerPrompt)},
                       {"max_steps", std::min(l.max_steps, SamplingLimits::kMaxSteps)},
                       {"max_cfg", SamplingLimits::kMaxCfg},
                       {"max_seed", SamplingLimits::kMaxSeed},
                       {"max_prompt_bytes", l.max_prompt_bytes}}}}
                    .dump());
    });

    http.Post("/api/generate", [this](const httplib::Request& req, httplib::Response& res) {
      // JSON only: a web page elsewhere cannot send this type to us without a CORS preflight,
      // which this server never grants.
      const std::string type = req.get_header_value("Content-Type");
      if (type.substr(0, type.find(';')) != "application/json")
        return send_json(res, 415, error_json("send the request as Content-Type: application/json"));
      GenerateRequest r;
      try {
        r = parse_generate_request(req.body, opt.limits);
      } catch (const Error& e) {
        return send_json(res, 400, error_json(e.what()));
      }
      std::lock_guard lk(mu);
      if (stopping) return send_json(res, 503, error_json("the server is stopping"));
      if (queue.size() >= opt.limits.queue_size) {
        res.set_header("Retry-After", "5");
        return send_json(res, 503, error_json(fmt::format("the generation queue is full ({} waiting); try again "
                                                          "in a few seconds", queue.size())));
      }
      auto job = std::make_shared<Job>();
      job->id = next_id++;
      job->req = r;
      job->command = gen->sample_command(r);
      jobs[job->id] = job;
      queue.push_back(job);
      cv.notify_all();
      json out = job_json(*job);
      out["url"] = fmt::format("/api/jobs/{}", job->id);
      send_json(res, 202, out.dump());
    });

    // ?after=K: long poll, answering once the job has more than K images or has ended (at
    // most 20 s), so the page shows each picture as soon as it exists.
    http.Get(R"(/api/jobs/([0-9]{1,12}))", [this](const httplib::Request& req, httplib::Response& res) {
      std::unique_lock lk(mu);
      auto it = jobs.find(std::stoull(req.matches[1].str()));
      if (it == jobs.end()) return send_json(res, 404, error_json("no such job (finished jobs are kept for a while only)"));
      auto job = it->second;
      if (req.has_param("after")) {
        const std::string a = req.get_param_value("after");
        if (a.empty() || a.size() > 6 || a.find_first_not_of("0123456789") != std::string::npos)
          return send_json(res, 400, error_json("'after' must be a number of images"));
        const size_t after = std::stoul(a);
        std::string status = job->status;
        cv.wait_for(lk, std::chrono::seconds(20), [&] {
          return stopping || job->pngs.size() > after || job->status != status ||
                 (job->status != "queued" && job->status != "running");
        });
      }
      send_json(res, 200, job_json(*job).dump());
    });
    http.Get(R"(/api/jobs)", [this](const httplib::Request&, httplib::Response& res) {
      std::lock_guard lk(mu);
      json out = json::array();
      for (auto it = jobs.rbegin(); it != jobs.rend(); ++it) out.push_back(job_json(*it->second));
      send_json(res, 200, json{{"jobs", out}}.dump());
    });
    http.Get(R"(/api/jobs/([0-9]{1,12})/images/([0-9]{1,4})\.png)",
             [this](const httplib::Request& req, httplib::Response& res) {
               std::lock_guard lk(mu);
               auto it = jobs.find(std::stoull(req.matches[1].str()));
               const size_t k = std::stoul(req.matches[2].str());
               if (it == jobs.end() || k >= it->second->pngs.size())
                 return send_json(res, 404, error_json("no such image"));
               res.set_header("Cache-Control", "private, max-age=86400");
               res.set_header("Content-Disposition",
                              fmt::format("inline; filename=\"microdit-{}-seed{}.png\"", it->second->id,
                                          it->second->req.seed + k));
               res.set_content(it->second->pngs[k], "image/png");
             });

    http.Get("/api/runs", [this](const httplib::Request&, httplib::Response& res) {
      json out = json::array();
      for (const auto& name : list_runs(opt.runs)) {
        auto s = run_summary_json(opt.runs, name);
        if (!s.empty()) out.push_back(json::parse(s));
      }
      send_json(res, 200, json{{"runs", out}}.dump());
    });
    auto run_route = [this](std::string (*f)(const std::string&, const std::string&)) {
      return [this, f](const httplib::Request& req, httplib::Response& res) {
        const std::string body = f(opt.runs, req.matches[1].str());
        if (body.empty()) return send_json(res, 404, error_json("no such run"));
        send_json(res, 200, body);
      };
    };
    http.Get(R"(/api/runs/([^/]{1,200}))", run_route(&run_summary_json));
    http.Get(R"(/api/runs/([^/]{1,200})/metrics)", run_route(&run_metrics_json));
    http.Get(R"(/api/runs/([^/]{1,200})/samples)", run_route(&run_samples_json));
    http.Get(R"(/api/runs/([^/]{1,200})/files/(.{1,200}))", [this](const httplib::Request& req, httplib::Response& res) {
      send_run_file(res, req.matches[1].str(), req.matches[2].str());
    });
  }
};

Server::Server(ServeOptions options, std::unique_ptr<ImageGenerator> generator) : impl_(std::make_unique<Impl>()) {
  impl_->opt = std::move(options);
  impl_->gen = std::move(generator);
  MD_CHECK(impl_->gen != nullptr, "serve: no image generator");
  MD_CHECK(impl_->opt.limits.queue_size >= 1, "serve: the queue size must be >= 1");
  impl_->routes();
  impl_->worker = std::thread([this] { impl_->work(); });
}

Server::~Server() {
  stop();
  if (impl_->worker.joinable()) impl_->worker.join();
}

int Server::bind() {
  auto& i = *impl_;
  MD_CHECK(i.opt.port >= 0 && i.opt.port <= 65535, "--port must be in [0, 65535], got {}", i.opt.port);
  if (i.opt.port == 0) {
    i.port = i.http.bind_to_any_port(i.opt.host);
    MD_CHECK(i.port > 0, "cannot listen on {} (any port)", i.opt.host);
  } else {
    MD_CHECK(i.http.bind_to_port(i.opt.host, i.opt.port), "cannot listen on {}:{} (in use, or not an address of "
             "this machine)", i.opt.host, i.opt.port);
    i.port = i.opt.port;
  }
  i.bound = true;
  return i.port;
}

int Server::port() const { return impl_->port; }

void Server::run() {
  MD_CHECK(impl_->bound, "serve: bind() before run()");
  {
    std::lock_guard lk(impl_->mu);
    if (impl_->stopping) return;
    impl_->listening = true;
  }
  impl_->http.listen_after_bind();
  std::lock_guard lk(impl_->mu);
  impl_->listening = false;
}

void Server::stop() {
  bool listening = false;
  {
    std::lock_guard lk(impl_->mu);
    impl_->stopping = true;
    listening = impl_->listening;
  }
  impl_->cv.notify_all();
  // run() may be between its check and httplib's start: wait for it to be running (<= 2 s).
  for (int k = 0; listening && k < 200 && !impl_->http.is_running(); ++k)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  impl_->http.stop();
}

void Server::pause_worker(bool paused) {
  {
    std::lock_guard lk(impl_->mu);
    impl_->paused = paused;
  }
  impl_->cv.notify_all();
}

}  // namespace microdit::serve
